"""Training: token streams, the trainer loop, schedule and optimizer."""
