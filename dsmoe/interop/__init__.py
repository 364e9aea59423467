"""Interoperability with other checkpoint formats.

  hf              load_hf / convert / export: DeepSeekMoE v1 checkpoints in the
                  HuggingFace layout (config.json + safetensors)
  hf_config       config.json <-> dsmoe config
  hf_layout       HF tensor names and layouts of each dsmoe parameter
  safetensors_io  streaming safetensors reader / sharded writer

(A HuggingFace tokenizer.json is read by dsmoe.data.hf_tokenizer.)
"""
