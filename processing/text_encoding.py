"""Text to token rows for the processor: data encoded as data, image placeholders expanded, images never truncated.

A sample reaches the tokenizer as *segments*, `(kind, piece, start)`:

- "text": data; special-token strings in it (`<|eot_id|>`, `<|begin_of_image|>`, ...) are encoded as the characters
  they are written with (the tokenizer's `split_special_tokens=True`);
- "trusted": encoded as the tokenizer does, its special tokens control tokens (a chat template's own text, text the
  caller vouches for);
- "token": one token of the vocabulary, given as its string (an `<|image|>` placeholder, an appended eos).

`start` is where the piece begins in the string it was cut from, so token offsets index that string (for a chat, the
rendered template, whose `{% generation %}` spans give the assistant mask).

Chat messages are rendered with their special-token strings wrapped in private-use markers (`mark_control_tokens`),
and `chat_segments` cuts the rendered chat at the markers: marked strings are "text", the rest "trusted".

This file travels to the Hub with the processor: it imports only the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

Segment = tuple[str, str, int]

_MARK_START, _MARK_END = "\U000f1000", "\U000f1001"
_MARKED = re.compile(f"{_MARK_START}(.*?){_MARK_END}", re.DOTALL)
STRAY_MARK = re.compile(f"[{_MARK_START}{_MARK_END}]")


@dataclass
class TokenRow:
    """One sample's tokens while they are built: ids, character offsets, and which tokens belong to images."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    in_image: list[bool] = field(default_factory=list)
    image_spans: list[tuple[int, int]] = field(default_factory=list)


def text_segments(text: str, image_token: str, split: bool) -> list[Segment]:
    """`text` as "text" pieces around its image placeholders ("token"); without `split`, one "trusted" piece."""
    if not split:
        return [("trusted", text, 0)]
    segments, start = [], 0
    for match in re.finditer(re.escape(image_token), text):
        segments += [("text", text[start : match.start()], start), ("token", match.group(), match.start())]
        start = match.end()
    return [*segments, ("text", text[start:], start)]


def control_token_pattern(tokenizer, placeholder: str) -> re.Pattern:
    """A regex for the special tokens that data must not write: every special added token but `placeholder`."""
    tokens = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    tokens.discard(placeholder)
    longest_first = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, longest_first)) or "(?!)")


def mark_control_tokens(obj: Any, pattern: re.Pattern) -> Any:
    """A copy of `obj` (messages, a message, its content) with the `pattern` matches in its strings wrapped in
    markers. Markers already in a string are removed first, so data cannot forge one."""
    if isinstance(obj, str):
        return pattern.sub(lambda match: _MARK_START + match.group() + _MARK_END, STRAY_MARK.sub("", obj))
    if isinstance(obj, dict):
        return {key: mark_control_tokens(value, pattern) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(value, pattern) for value in obj]
    return obj


def chat_segments(rendered: str) -> list[Segment]:
    """A rendered chat as segments: marked strings "text", the rest "trusted". Stray markers (a template that split
    a marked string) are dropped, and the text on either side is encoded apart."""
    pieces, start = [], 0
    for match in _MARKED.finditer(rendered):
        pieces += [("trusted", start, match.start()), ("text", match.start(1), match.end(1))]
        start = match.end()
    pieces.append(("trusted", start, len(rendered)))
    segments = []
    for kind, begin, end in pieces:
        cursor = begin
        for stray in STRAY_MARK.finditer(rendered, begin, end):
            segments.append((kind, rendered[cursor : stray.start()], cursor))
            cursor = stray.end()
        segments.append((kind, rendered[cursor:end], cursor))
    return [segment for segment in segments if segment[1]]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence with `add_special_tokens=True` (bos for Llama 3)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def tokenize_segments(
    tokenizer,
    samples: list[list[Segment]],
    around: tuple[list[int], list[int]] = ([], []),
    with_offsets: bool = True,
) -> list[TokenRow]:
    """Each sample's segments as one row of ids and offsets, in two batched tokenizer calls (one per kind), between
    `around`'s prefix and suffix ids (see `special_tokens_around`). Without `with_offsets` (which needs a fast
    tokenizer) the offsets are all (0, 0)."""
    jobs: dict[str, list[tuple[int, int, str]]] = {"text": [], "trusted": []}
    for s, segments in enumerate(samples):
        for k, (kind, piece, _) in enumerate(segments):
            if kind != "token" and piece:
                jobs[kind].append((s, k, piece))
    encoded = {}
    for kind in ("text", "trusted"):  # trusted last: a fast tokenizer's backend keeps the last call's split setting
        if jobs[kind]:
            out = tokenizer(
                [piece for _, _, piece in jobs[kind]],
                add_special_tokens=False,
                split_special_tokens=kind == "text",
                return_offsets_mapping=with_offsets,
            )
            offsets = out["offset_mapping"] if with_offsets else [[(0, 0)] * len(ids) for ids in out["input_ids"]]
            for (s, k, _), piece_ids, piece_offsets in zip(jobs[kind], out["input_ids"], offsets):
                encoded[s, k] = piece_ids, piece_offsets
    prefix, suffix = around
    rows = []
    for s, segments in enumerate(samples):
        row = TokenRow(list(prefix), [(0, 0)] * len(prefix))
        for k, (kind, piece, start) in enumerate(segments):
            if kind == "token":
                row.ids.append(tokenizer.convert_tokens_to_ids(piece))
                row.offsets.append((start, start + len(piece)))
            elif (s, k) in encoded:
                ids, offsets = encoded[s, k]
                row.ids += ids
                row.offsets += [(start + a, start + b) for a, b in offsets]
        row.ids += suffix
        row.offsets += [(0, 0)] * len(suffix)
        rows.append(row)
    return rows


def expand_image_tokens(
    rows: list[TokenRow], tokens_per_image: list[int], image_token_id: int, boi_token_id: int, eoi_token_id: int
) -> None:
    """Replace the i-th image id across the rows with boi + image × tokens_per_image[i] + eoi, in place."""
    counts = iter(tokens_per_image)
    for row in rows:
        ids, offsets, in_image, spans = [], [], [], []
        for token, offset in zip(row.ids, row.offsets):
            if token == image_token_id:
                n = next(counts)
                spans.append((len(ids), len(ids) + n + 2))
                ids += [boi_token_id] + [image_token_id] * n + [eoi_token_id]
                offsets += [offset] * (n + 2)
                in_image += [True] * (n + 2)
            else:
                ids.append(token)
                offsets.append(offset)
                in_image.append(False)
        row.ids, row.offsets, row.in_image, row.image_spans = ids, offsets, in_image, spans


def truncation_on(truncation: Any) -> bool:
    """Whether a tokenizer-style `truncation` value (bool, str or TruncationStrategy) asks for truncation."""
    value = getattr(truncation, "value", truncation)
    if value == "only_second":
        raise ValueError("truncation='only_second' needs text pairs, which the processor does not take")
    return value not in (None, False, "do_not_truncate")


def truncate(row: TokenRow, max_length: int, side: str, index: int) -> TokenRow:
    """`row` cut to `max_length` tokens on `side`; a ValueError if that would drop any token of an image."""
    excess = len(row.ids) - max_length
    if excess <= 0:
        return row
    low, high = (excess, len(row.ids)) if side == "left" else (0, max_length)
    cut = [n for n, (start, end) in enumerate(row.image_spans) if start < low or end > high]
    if cut:
        start, end = row.image_spans[cut[0]]
        starts, ends = zip(*row.image_spans)
        needed = len(row.ids) - min(starts) if side == "left" else max(ends)
        raise ValueError(
            f"sample {index}: truncating its {len(row.ids)} tokens to max_length={max_length} ({side} side) would cut "
            f"image {cut[0]} (tokens {start}..{end - 1}); images are never cut. Use max_length >= {needed}, "
            f"truncation=False, or fewer or smaller images"
        )
    keep = slice(low, high)
    spans = [(start - low, end - low) for start, end in row.image_spans]
    return TokenRow(row.ids[keep], row.offsets[keep], row.in_image[keep], spans)


def pad_to(values: list[Any], length: int, fill: Any, side: str) -> list[Any]:
    padding = [fill] * (length - len(values))
    return padding + values if side == "left" else values + padding


def overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < span_end and end > span_start for span_start, span_end in spans)
