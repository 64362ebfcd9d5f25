"""Stage 1, the frozen base: load a Hugging Face folder or GGUF file, and its 4-bit formats (nf4/fp4 from
bitsandbytes, and the project's own packed int4 layout)."""
