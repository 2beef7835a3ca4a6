"""One folder per method, laid out like PEFT's own tuners (config.py, layer.py, model.py);
importing a folder registers its tuner with PEFT."""
