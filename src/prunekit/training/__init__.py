"""Training-time pruning and the plain training loops every dimension shares."""
