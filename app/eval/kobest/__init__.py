"""KoBEST (skt/kobest_v1) evaluated on a GGUF the way the Polyglot-Ko model card's numbers were made.

Followed source: EleutherAI/lm-evaluation-harness, branch `polyglot`, commit d21107eb39766a056e8807a9d4f3fc61d2f84536
(2023-12-18); `lm_eval/tasks/kobest.py` as last changed there by 1bf3c505a19b509dd68452a10b3ca785ed07727d
("fix: add acc_norm in kobest_hellaswag", 2023-04-15), with `lm_eval/base.py` (fewshot_context, MultipleChoiceTask,
_loglikelihood_tokens), `lm_eval/evaluator.py` (split choice, shuffling, the few-shot rng), `lm_eval/metrics.py`
(macro_f1_score = sklearn f1_score(average="macro")) and `lm_eval/models/gpt2.py` (HFLM: tok_encode without special
tokens, max_length = max_position_embeddings). Other public copies differ and were NOT followed: the first version on
the main branch (112c88399, no COPA/HellaSwag, binary F1, a doc_to_target that formats a dict),
kabbi159/lm-evaluation-harness (same era), and Beomi/ko-lm-evaluation-harness and jwkweon/eval-kobest (later
"내용: … 질문: 다음 문장이 …" prompts, "(부정)"/"(긍정)" targets, COPA scored without the leading space).

Modules: tasks (prompts per task), data (reading the published files, the hub, or the bundled sample), metrics
(macro F1 and accuracy in numpy), evaluate (doc order, few-shot sampling, scoring through app.eval.loglik), render.
"""
