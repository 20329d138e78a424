"""De-duplication and quality filtering, with a report of everything removed.

Order of the stages in `clean_documents` (each document stops at the first that removes it):
  1. exact duplicates: hash of the case-folded, whitespace-collapsed text
  2. quality filters (plain documents only; chat turns are legitimately short)
  3. near duplicates: MinHash over word 5-gram shingles + LSH (datasketch)

Filtering runs before near-dup detection so that a junk document can never be the
"original" that a good near-copy of it gets dropped in favour of, and so the costly
MinHash step sees fewer documents.

Quality filters follow the Gopher rules (Rae et al. 2021, "Scaling Language Models",
appendix A: 50..100k words, mean word length 3..10, <=30% duplicate lines) with two
changes for a small toolkit: the minimum is 5 words (not 50), so paragraph-split and
short-form data survive; and instead of "80% of words contain a letter" we require a
fraction of letters among non-space characters (default 0.5), which catches tables of
numbers, base64 and markup dumps.
"""

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from nanoseek.data.ingest import Document
from nanoseek.errors import NanoseekError

# -----------------------------------------------------------------------------
# Exact duplicates

_WS = re.compile(r"\s+")


def dedup_key(text: str) -> str:
    """Hash of the text with case and whitespace differences removed."""
    canonical = _WS.sub(" ", text.casefold()).strip()
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


# -----------------------------------------------------------------------------
# Near duplicates

_WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of the lower-cased text, punctuation ignored; short texts give one shingle."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


class NearDupIndex:
    """MinHash-LSH index that answers "is this a near-copy of something already added?".

    LSH only proposes candidates (it is tuned to the threshold but probabilistic), so each
    candidate is confirmed with the MinHash Jaccard estimate before a document is dropped.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        from datasketch import MinHash, MinHashLSH  # imported here: only this stage needs it

        if not 0.0 < threshold <= 1.0:
            raise NanoseekError(f"near-dup threshold must be in (0, 1], got {threshold}")
        self.threshold, self.ngram = threshold, ngram
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        # One set of permutations for all documents: a MinHash draws its own otherwise, which
        # costs time per document and 1 KiB of memory per kept signature.
        self._MinHash = MinHash
        self._template = MinHash(num_perm=num_perm, seed=seed)
        self.signatures: list[np.ndarray] = []  # position i = i-th added document
        self.names: list[str] = []

    def _minhash(self, shingle_set: set[str]):
        t = self._template
        m = self._MinHash(num_perm=len(t), seed=t.seed, permutations=t.permutations, scheme=t.scheme)
        m.update_batch([s.encode("utf-8") for s in shingle_set])
        return m

    def add(self, text: str, name: str = "") -> str | None:
        """Return the name of an earlier near-duplicate, or index the text and return None."""
        shingle_set = shingles(text, self.ngram)
        if not shingle_set:
            return None  # nothing to compare: empty text is the filters' business
        m = self._minhash(shingle_set)
        for key in self.lsh.query(m):
            # estimated Jaccard = fraction of equal MinHash values (what MinHash.jaccard computes)
            if np.mean(m.hashvalues == self.signatures[key]) >= self.threshold:
                return self.names[key]
        key = len(self.signatures)
        self.lsh.insert(key, m)
        self.signatures.append(m.hashvalues.copy())
        self.names.append(name)
        return None


# -----------------------------------------------------------------------------
# Quality filters


@dataclass
class QualityFilter:
    min_chars: int = 20
    max_chars: int = 1_000_000
    min_words: int = 5
    max_words: int = 100_000
    min_mean_word_len: float = 3.0
    max_mean_word_len: float = 10.0
    min_alpha_frac: float = 0.5  # letters / non-space characters
    max_dup_line_frac: float = 0.3  # repeated non-empty lines / non-empty lines

    def reason(self, text: str) -> tuple[str, str] | None:
        """(reason, detail) for the first rule the text breaks, or None if it passes."""
        n_chars = len(text)
        if n_chars < self.min_chars:
            return "too_few_chars", f"{n_chars} < {self.min_chars}"
        if n_chars > self.max_chars:
            return "too_many_chars", f"{n_chars} > {self.max_chars}"
        words = text.split()
        if len(words) < self.min_words:
            return "too_few_words", f"{len(words)} < {self.min_words}"
        if len(words) > self.max_words:
            return "too_many_words", f"{len(words)} > {self.max_words}"
        mean_len = sum(len(w) for w in words) / len(words)
        if mean_len < self.min_mean_word_len:
            return "mean_word_len_too_low", f"{mean_len:.2f} < {self.min_mean_word_len}"
        if mean_len > self.max_mean_word_len:
            return "mean_word_len_too_high", f"{mean_len:.2f} > {self.max_mean_word_len}"
        alpha = alpha_fraction(text)
        if alpha < self.min_alpha_frac:
            return "low_alpha_fraction", f"{alpha:.2f} < {self.min_alpha_frac}"
        dup = duplicate_line_fraction(text)
        if dup > self.max_dup_line_frac:
            return "repeated_lines", f"{dup:.2f} > {self.max_dup_line_frac}"
        return None


def alpha_fraction(text: str) -> float:
    """Letters as a fraction of non-whitespace characters."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-empty lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


# -----------------------------------------------------------------------------
# Report


@dataclass
class CleaningReport:
    max_examples: int = 3  # per removal reason
    input_documents: int = 0
    kept_documents: int = 0
    input_chars: int = 0
    kept_chars: int = 0
    removed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def saw(self, doc: Document) -> None:
        self.input_documents += 1
        self.input_chars += len(doc.text)

    def kept(self, doc: Document) -> None:
        self.kept_documents += 1
        self.kept_chars += len(doc.text)

    def removed_doc(self, doc: Document, reason: str, detail: str) -> None:
        self.removed[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            snippet = doc.text[:200] + ("..." if len(doc.text) > 200 else "")
            examples.append({"source": doc.source, "detail": detail, "text": snippet})

    def to_dict(self) -> dict:
        return {
            "input_documents": self.input_documents,
            "kept_documents": self.kept_documents,
            "removed_documents": sum(self.removed.values()),
            "input_chars": self.input_chars,
            "kept_chars": self.kept_chars,
            "removed": dict(sorted(self.removed.items())),
            "examples": self.examples,
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -----------------------------------------------------------------------------
# Pipeline


def clean_documents(
    docs: Iterable[Document],
    exact: bool = True,
    near: bool = True,
    near_threshold: float = 0.8,
    filters: bool = True,
    quality: QualityFilter | None = None,
    report: CleaningReport | None = None,
) -> Iterator[Document]:
    """Stream the documents that survive dedup and filtering; removals go into `report`.

    quality=None means the default QualityFilter; filters=False skips the filters.
    """
    quality = (quality or QualityFilter()) if filters else None
    report = report if report is not None else CleaningReport()
    report.settings = {
        "exact_dedup": exact,
        "near_dedup": near,
        "near_threshold": near_threshold if near else None,
        "quality": asdict(quality) if quality else None,
    }
    seen: dict[str, str] = {}  # dedup key -> source of first occurrence
    index = NearDupIndex(threshold=near_threshold) if near else None
    for doc in docs:
        report.saw(doc)
        verdict = _judge(doc, exact, seen, quality, index)
        if verdict is None:
            report.kept(doc)
            yield doc
        else:
            report.removed_doc(doc, *verdict)


def _judge(doc, exact, seen, quality, index) -> tuple[str, str] | None:
    """(reason, detail) if the document should be dropped; registers it as seen otherwise."""
    if exact:
        key = dedup_key(doc.text)
        if key in seen:
            return "exact_duplicate", f"same text as {seen[key]}"
    if quality and doc.messages is None:
        verdict = quality.reason(doc.text)
        if verdict is not None:
            return verdict
    if exact:
        seen[key] = doc.source  # only kept documents can be the "original" of a duplicate
    if index is not None:
        original = index.add(doc.text, doc.source)
        if original is not None:
            return "near_duplicate", f"near-copy of {original}"
    return None
