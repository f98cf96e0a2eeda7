"""Checkpoint input and output: zero-copy safetensors reading and atomic writing (`safetensors_io`), the
weight store and its readers (`weights`), the profile manifest (`profile`), pinning (`pinning`) and GGUF
export (`gguf_export`)."""
