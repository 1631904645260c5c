"""Engine connectors (vLLM, HF transformers, SGLang). Built by the connectors issue; empty until then."""
