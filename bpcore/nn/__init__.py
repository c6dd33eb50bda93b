"""The math: activations, losses, the forward and backward pass, the MLP model, initialisation, targets, gradcheck."""
