"""The streaming VLM eviction policy restated for tests, written apart from the ledger."""


def kept_units(history, config, grid_index: int):
    """Units kept after eviction: sinks by stream index, then the newest frame chunks within the vision window and
    the newest text tokens within the text window. A unit is a tuple whose first item is its token ids, item
    ``grid_index`` its grid (None for text) and item ``grid_index + 1`` its frame count."""
    keep, index = [False] * len(history), 0
    for i, u in enumerate(history):
        keep[i] = index < config.sink_tokens
        index += len(u[0])
    frames, text, vision_open = config.vision_window_frames, config.text_window_tokens, True
    for i in reversed(range(len(history))):
        if keep[i]:
            continue
        if history[i][grid_index] is not None:
            count = history[i][grid_index + 1]
            vision_open = vision_open and count <= frames
            keep[i] = vision_open
            frames -= count if vision_open else 0
        elif text > 0:
            keep[i], text = True, text - 1
    return [u for u, k in zip(history, keep, strict=True) if k]
