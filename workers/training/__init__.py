"""Training custom ControlNets: datasets, the training loop, checkpoints, and the demo's trained parts."""
