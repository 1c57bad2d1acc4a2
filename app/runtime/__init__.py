"""The runtime: the only package that imports llama_cpp — everything it takes to run a GGUF.

llama (bindings: Model, Context, Batch, logs) · engine (streaming generation, KV reuse) · stream (UTF-8 and stop
strings) · step (what each generated token goes through, and StopReason: why an answer ended, in every API's words)
· batching (the server's scheduler) with events (its jobs and what they hear back) · settings (the table of every
setting, Sampling) · devices (the GPUs ggml can run on: CUDA, Metal, ROCm, Vulkan, SYCL) · offload (how many
layers on which GPUs) · hardware (cores, RAM, the GPUs a build cannot use: install hints) · gguf_info (the header
and what it means) · templates (prompt formats) · quant (llama.cpp's quantizers) · windows (a text in
llama-perplexity's windows: what eval scores and the importance matrix reads) · logprobs (log-softmax, NLL sums) ·
ggml (ggml's own C functions and tensor struct) · activations (what each weight matrix sees: the importance
matrix's sums).
"""
