"""megatron-muon."""
