"""Running fedtune on Flower's Deployment Engine: development certificates and keys, the
processes of a local federation, and `fedtune deploy-local`. No transport of our own: the
SuperLink, SuperNodes and `flwr run` are Flower's."""
