"""What a worker holds: the base model (`base_model`), input adapters read from any location
(`adapters`) and the adapter cache (`cache`)."""
