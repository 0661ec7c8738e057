import pytest

from dsmoe.data.tokenizer import train_bpe

SENTENCE = (
    "the quick brown fox jumps over the lazy dog while a small red hen sings about rivers, "
    "mountains and the sea; numbers like 42 and 1999 appear too."
)
WORDS = SENTENCE.split(" ")


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    """Deterministic little documents of varying length made from a fixed word list."""
    docs = []
    for i in range(n):
        length = 5 + (i * 7 + seed) % 23
        docs.append(" ".join(WORDS[(i * 3 + j * 5 + seed) % len(WORDS)] for j in range(length)) + f" doc{i}.")
    return docs


@pytest.fixture(scope="session")
def small_tokenizer():
    return train_bpe(synthetic_documents(200), vocab_size=300)


@pytest.fixture(scope="session")
def make_docs():
    return synthetic_documents
