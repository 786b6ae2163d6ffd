"""deadneuron.patch"""
