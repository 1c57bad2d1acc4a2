"""Measuring a model on the GGUF itself: perplexity, quantization loss, KoBEST, speed.

scoring (log-softmax, NLL sums; with the windows scored, as llama-perplexity, both in app.runtime) · perplexity ·
compare (KL, top-1) · loglik (choice log-likelihoods) · kobest/ · bench · upstream (llama.cpp's tools) · views.
"""
