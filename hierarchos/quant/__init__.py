"""Quantized weights: block formats (numpy reference in `formats`), the C++ kernel or its
reference behind one API (`kernel`), and, beside them, GGUF I/O and the quantized model."""
