"""The bundled ARC slot-attention autoencoder, a reproducible reference for deadneuron."""
