"""Measuring a model on the GGUF itself: perplexity, quantization loss, KoBEST, speed.

windows (the text and the windows scored, as llama-perplexity) · scoring (log-softmax, NLL sums) · perplexity ·
compare (KL, top-1) · loglik (choice log-likelihoods) · kobest/ · bench · upstream (llama.cpp's tools) · views.
"""
