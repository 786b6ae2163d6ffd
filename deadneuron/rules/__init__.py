"""deadneuron.rules"""
