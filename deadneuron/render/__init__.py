"""deadneuron.render"""
