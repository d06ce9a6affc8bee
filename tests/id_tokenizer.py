"""A stand-in tokenizer for tests of the generation engine; it imports nothing, so that the multi-process
workers that measure their memory can use it too."""


class IdTokenizer:
    """A tokenizer whose text is the token ids (vocabulary 256; 0 ends a sequence, 1 pads): all the generation engine
    asks of one."""

    vocab_size, eos_id, pad_id = 256, 0, 1
    eos_ids, never_sampled = (0,), (1,)

    def prompt_ids(self, text):
        return [int(t) for t in text.split()]

    def decode_bytes(self, ids):
        return "".join(f" {i}" for i in ids).encode()
