"""Checks shared by the tokenizer tests."""


def assert_left_padded(tok, texts, pad_id):
    """`tok(texts, padding=True)` gives every row its own encoding padded on the left with `pad_id` (mask 0) to the
    longest one."""
    out = tok(texts, padding=True)
    longest = max(len(tok.encode(t)) for t in texts)
    for text, ids, mask in zip(texts, out['input_ids'], out['attention_mask']):
        real = tok.encode(text)
        assert ids == [pad_id] * (longest - len(real)) + real, text
        assert mask == [0] * (longest - len(real)) + [1] * len(real), text
