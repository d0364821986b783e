"""The kernel/user contract, written once: constants both sides use and record layouts.

Constants (stats indexes, duration buckets, SQL statement kinds) live here and reach the
C side as `-D` cflags (`prelude_cflags`): probes/common.h has no copy of them. Record
structs live in one C header per target (probes/<name>.h); their Python decoders are
`RecordLayout`s, which tests/unit/test_contract.py holds against the header compiled by
the host compiler (every field's offset and size).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

# Span kinds as OTLP numbers them (opentelemetry.proto.trace.v1.Span.SpanKind).
KIND_INTERNAL = 1
KIND_SERVER = 2
KIND_CLIENT = 3


class Stat(IntEnum):
    """Indexes of the per-CPU `stats` array of every program (probes/common.h)."""

    EVENTS = 0  # records written to the ring buffer
    LOST = 1  # records lost: ring buffer full
    UNMATCHED = 2  # an end without its start, or a start overwritten
    SAMPLED_OUT = 3  # finished operations not sent as spans (sampling, budget)
    OPERATIONS = 4  # finished operations, sent or not
    KEPT_BY_PARENT = 5  # spans kept over the budget because their parent was sampled


STAT_MAX = 8

# Stable duration buckets of http.server.request.duration and db.client.operation.duration (s).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# Statement kinds the kernel tells apart by the first keyword; the index is the code the
# kernel puts in histogram keys (0 = other). Alternatives share a code: START -> BEGIN.
# The kernel compares at most 8 bytes: no keyword may be longer.
SQL_OPERATIONS = ("_OTHER", "SELECT", "INSERT", "UPDATE", "DELETE", "BEGIN", "COMMIT", "ROLLBACK", "WITH",
                  "CALL", "CREATE", "DROP", "ALTER", "SET", "SHOW", "COPY", "REPLACE", "TRUNCATE", "EXPLAIN",
                  "EXECUTE", "PREPARE", "FETCH")
_SQL_KEYWORD_CODES = {word: code for code, word in enumerate(SQL_OPERATIONS) if code}
_SQL_KEYWORD_CODES.update({"START": 5, "END": 6, "ABORT": 7})


def sql_operation_name(code: int) -> str:
    return SQL_OPERATIONS[code] if 0 <= code < len(SQL_OPERATIONS) else "_OTHER"


def _keyword_word(word: str) -> int:
    """The keyword as the kernel compares it: up to 8 upper-case bytes, little-endian u64."""
    return int.from_bytes(word.encode("ascii"), "little")


def prelude_cflags() -> list[str]:
    """-D cflags that define the shared constants for probes/common.h."""
    chain = " ".join(f"DURATION_BUCKET({i},{round(b * 1e9)}ULL)" for i, b in enumerate(DURATION_BUCKETS))
    keywords = " ".join(f"SQL_KEYWORD({len(w)},{code},{_keyword_word(w):#x}ULL)"
                        for w, code in sorted(_SQL_KEYWORD_CODES.items(), key=lambda kv: -len(kv[0])))
    return [*(f"-DSTAT_{s.name}={s.value}" for s in Stat), f"-DSTAT_MAX={STAT_MAX}",
            f"-DDURATION_BUCKET_CHAIN={chain}", f"-DDURATION_BUCKET_INF={len(DURATION_BUCKETS)}",
            f"-DSQL_KEYWORD_CHAIN={keywords}"]


# --- record layouts -----------------------------------------------------------------------

_C_TYPES = {"Q": "u64", "q": "s64", "I": "u32", "i": "s32", "H": "u16", "h": "s16", "B": "u8", "b": "s8"}


@dataclass(frozen=True)
class RecordLayout:
    """The fixed head of a ring buffer record, as `struct.Struct` reads it.

    `fields` are (C member name, struct format) in order: explicit pads in the C struct
    are fields here too, so the format has no implicit padding ("<"). `tail` names the
    variable-length member that follows the head (e.g. the query text), if any: its
    offset is the head's size."""

    header: str  # file in probes/
    c_struct: str
    fields: tuple[tuple[str, str], ...]
    tail: str = ""
    struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "struct", struct.Struct("<" + "".join(fmt for _, fmt in self.fields)))

    @property
    def size(self) -> int:
        return self.struct.size

    def offsets(self) -> dict[str, tuple[int, int]]:
        """member -> (offset, size), as the C compiler must lay them out."""
        out, at = {}, 0
        for name, fmt in self.fields:
            size = struct.calcsize("<" + fmt)
            out[name] = (at, size)
            at += size
        return out

    def unpack_from(self, raw: bytes, offset: int = 0) -> tuple:
        return self.struct.unpack_from(raw, offset)


LAYOUTS: list[RecordLayout] = []  # every target's layouts, registered where they are defined


def layout(header: str, c_struct: str, fields: list[tuple[str, str]], tail: str = "") -> RecordLayout:
    """Declare (and register for the contract test) a record layout."""
    result = RecordLayout(header, c_struct, tuple(fields), tail)
    LAYOUTS.append(result)
    return result
