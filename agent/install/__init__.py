"""Installing a model on the device: the pure state machine and the actions around it."""
