"""Caption grammar of the tiny world, its parser (the exact inverse) and its word list.

Grammar (words separated by single spaces, no punctuation, so a whitespace tokenizer is enough)::

    caption    := object ("and" object)* "on a" background "background"
    object     := "a" SIZE COLOUR SHAPE motion
    motion     := "moving" DIRECTION | "staying still" | "bouncing"
    background := BG | BG "top and" BG "bottom" | BG "left and" BG "right"

Example: ``"a small red circle moving left and a large blue square bouncing on a navy top and black bottom
background"``. Objects appear in spec order; positions and speeds are not captioned.
"""

from __future__ import annotations

from .spec import (
    BACKGROUND_COLOURS,
    BOUNCE,
    LINEAR_MOTIONS,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    STILL,
    BackgroundSpec,
    ObjectDescription,
    SceneDescription,
    SceneSpec,
    describe,
)

_OBJECT_JOIN = " and "
_BACKGROUND_OPEN = " on a "
_BACKGROUND_CLOSE = " background"
_MOTION_PHRASES: dict[str, str] = {
    **{name: f"moving {name}" for name in LINEAR_MOTIONS},
    STILL: "staying still",
    BOUNCE: "bouncing",
}
_PHRASE_TO_MOTION = {phrase: motion for motion, phrase in _MOTION_PHRASES.items()}
# Two-tone layouts are captioned by naming where each half sits.
_LAYOUT_SIDES: dict[str, tuple[str, str]] = {"top-bottom": ("top", "bottom"), "left-right": ("left", "right")}


def _background_phrase(background: BackgroundSpec) -> str:
    if background.layout == "plain":
        return background.colours[0]
    first, second = _LAYOUT_SIDES[background.layout]
    return f"{background.colours[0]} {first} and {background.colours[1]} {second}"


def format_description(description: SceneDescription) -> str:
    """Caption text of a :class:`SceneDescription` (see the module grammar)."""
    objects = [f"a {o.size} {o.colour} {o.shape} {_MOTION_PHRASES[o.motion]}" for o in description.objects]
    return (
        _OBJECT_JOIN.join(objects) + _BACKGROUND_OPEN + _background_phrase(description.background) + _BACKGROUND_CLOSE
    )


def caption(spec: SceneSpec) -> str:
    """The caption of a scene.

    Example:
        >>> caption(sample_spec(0))  # doctest: +SKIP
        'a large cyan triangle moving up-left on a grey background'
    """
    return format_description(describe(spec))


def _parse_background(text: str, full: str) -> BackgroundSpec:
    words = text.split(" ")
    for name in words[:: 3 if len(words) > 1 else 1]:
        if name not in BACKGROUND_COLOURS:
            raise ValueError(
                f"caption: expected a background colour from {list(BACKGROUND_COLOURS)}, got {name!r} in {full!r}"
            )
    if len(words) == 1:
        return BackgroundSpec((words[0],), "plain")
    for layout, (first, second) in _LAYOUT_SIDES.items():
        if len(words) == 5 and words[1] == first and words[2] == "and" and words[4] == second:
            return BackgroundSpec((words[0], words[3]), layout)
    raise ValueError(
        f"caption: expected a background like 'navy', 'navy top and black bottom' or 'navy left and black right', "
        f"got {text!r} in {full!r}"
    )


def _parse_object(text: str, full: str) -> ObjectDescription:
    words = text.split(" ")
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"caption: expected an object like 'a small red circle moving left', got {text!r} in {full!r}")
    size, colour, shape = words[1:4]
    motion = _PHRASE_TO_MOTION.get(" ".join(words[4:]))
    for what, value, allowed in (("size", size, SIZES), ("colour", colour, SHAPE_COLOURS), ("shape", shape, SHAPES)):
        if value not in allowed:
            raise ValueError(f"caption: expected a {what} from {list(allowed)}, got {value!r} in {full!r}")
    if motion is None:
        raise ValueError(f"caption: expected a motion from {list(_PHRASE_TO_MOTION)}, got {text!r} in {full!r}")
    return ObjectDescription(colour=colour, shape=shape, size=size, motion=motion)


def parse_caption(text: str) -> SceneDescription:
    """Parse a caption back into what it describes: ``parse_caption(caption(s)) == describe(s)``.

    Raises ``ValueError`` naming the offending phrase when ``text`` is outside the grammar.
    """
    normalised = " ".join(text.strip().lower().split())
    head, sep, tail = normalised.rpartition(_BACKGROUND_OPEN)
    if not sep or not tail.endswith(_BACKGROUND_CLOSE):
        raise ValueError(f"caption: expected it to end with 'on a <colour(s)> background', got {text!r}")
    background = _parse_background(tail[: -len(_BACKGROUND_CLOSE)], text)
    # " and a " only ever starts a new object: background "and"s were split off above.
    chunks = head.split(_OBJECT_JOIN + "a ")
    objects = tuple(_parse_object(chunk if i == 0 else "a " + chunk, text) for i, chunk in enumerate(chunks))
    description = SceneDescription(objects, background)
    colours = [o.colour for o in objects]
    if len(set(colours)) != len(colours):
        raise ValueError(f"caption: expected a different colour per object, got {colours} in {text!r}")
    return description


def vocabulary() -> list[str]:
    """Every word the grammar can emit, sorted (for a word-level tokenizer)."""
    words = {"a", "and", "on", "background"}
    words.update(SIZES, SHAPE_COLOURS, SHAPES, BACKGROUND_COLOURS)
    for phrase in _MOTION_PHRASES.values():
        words.update(phrase.split(" "))
    for sides in _LAYOUT_SIDES.values():
        words.update(sides)
    return sorted(words)
