"""x-request-id values: random version 4 UUIDs made in batches (proxy/l7/request_ids.py)."""

from __future__ import annotations

import os
import random
import uuid

from proxy.l7.request_ids import BATCH, new_request_id, uuid4_batch


def _check(text: bytes) -> None:
    parsed = uuid.UUID(text.decode("ascii"))
    assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert str(parsed).encode() == text  # lowercase, 8-4-4-4-12, as uuid.uuid4() prints it


def test_every_id_is_a_version_4_uuid_in_text_form():
    for count in (1, 2, 3, 255):
        batch = uuid4_batch(count)
        assert len(batch) == count
        for text in batch:
            _check(text)


def test_ids_do_not_repeat_across_batches():
    ids = [new_request_id() for _ in range(3 * BATCH + 7)]
    for text in ids:
        _check(text)
    assert len(set(ids)) == len(ids)


def test_ids_do_not_follow_pythons_random_state():
    # ids from the kernel, not from `random` (whose state a batch's output would reveal): the same
    # seed before two batches gives two different batches
    random.seed(12)
    first = uuid4_batch(BATCH)
    random.seed(12)
    second = uuid4_batch(BATCH)
    for text in first + second:
        _check(text)
    assert not set(first) & set(second)


def test_every_random_digit_takes_every_value():
    # the 30 free digits of each id (dashes, version and variant excluded) over 4,000 ids: a digit
    # position stuck at one value (a strided assignment off by one) would show as a missing value
    ids = uuid4_batch(4000)
    for position in [i for i in range(36) if i not in (8, 13, 14, 18, 19, 23)]:
        assert {text[position] for text in ids} == set(b"0123456789abcdef"), position
    assert {text[19] for text in ids} == set(b"89ab")


def test_a_forked_worker_never_hands_out_the_parent_ids():
    new_request_id()  # the parent now holds a batch, which a fork copies
    parent_next = [new_request_id() for _ in range(8)]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: its ids, to the parent
        try:
            os.write(write_end, b" ".join(new_request_id() for _ in range(8)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(child_ids) == 8
    parent_ids = parent_next + [new_request_id() for _ in range(8)]
    assert not set(child_ids) & set(parent_ids)
