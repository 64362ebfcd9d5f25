"""Stage 2, the adapters: the LoRA layer on a quantized base, PiSSA/LoftQ initialisation, and adapter files
in PEFT's layout."""
