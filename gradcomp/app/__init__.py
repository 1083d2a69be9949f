"""The training application: config, data, models, the training loop and checkpoints, the Ray launcher, the analyzer."""
