"""MovingShapes (data/moving_shapes.py): clips are a pure function of (seed, split, index) and the rate; a scene is
the same at every rate; the answers agree with the pixels (an appearing shape's color is absent before its second
and present from it on; a mover's pixels travel in the direction its answer names, the other object's stay); the
splits keep ShapesWorld's held-out combinations; bad settings are refused."""

import numpy as np
import pytest

from polymodal.data.moving_shapes import DIRECTIONS, MovingShapes
from polymodal.data.shapes import HELD_OUT

N = 80  # clips checked per property


def _mask(frame, fill) -> np.ndarray:
    """Where a frame holds exactly the object's fill color (PIL draws flat fills, no antialiasing)."""
    return (np.asarray(frame) == np.array(fill, dtype=np.uint8)).all(-1)


def _centroid(frame, fill) -> np.ndarray:
    ys, xs = np.nonzero(_mask(frame, fill))
    return np.array([xs.mean(), ys.mean()])


def test_clips_are_a_pure_function_of_seed_split_index_and_rate():
    a, b = MovingShapes(seed=3), MovingShapes(seed=3)
    for i in range(10):
        x, y = a.sample(i), b.sample(i)
        assert x.qa == y.qa and x.fps == y.fps and x.tracks == y.tracks
        assert all(np.array_equal(np.asarray(f), np.asarray(g)) for f, g in zip(x.frames, y.frames))
    other = MovingShapes(seed=4)
    assert [other.sample(i).qa for i in range(10)] != [a.sample(i).qa for i in range(10)]


def test_the_scene_is_the_same_at_every_rate():
    world = MovingShapes(seed=0, duration=(4, 6))
    for i in range(20):
        clips = {r: world.sample(i, fps=r) for r in (1.0, 2.0, 4.0)}
        assert len({(c.kind, c.duration, c.tracks, c.qa) for c in clips.values()}) == 1
        for r, c in clips.items():
            assert len(c.frames) == c.duration * r and c.fps == r
            assert c.times == [k / r for k in range(len(c.frames))]
        # the frame at one second is the same picture whatever the rate
        for second in range(clips[1.0].duration):
            pictures = [np.asarray(c.frames[int(second * r)]) for r, c in clips.items()]
            assert all(np.array_equal(pictures[0], p) for p in pictures[1:])


def test_the_rate_of_a_clip_comes_from_its_index():
    world = MovingShapes(fps=(1, 2, 4))
    rates = [world.sample(i).fps for i in range(60)]
    assert set(rates) == {1.0, 2.0, 4.0}
    assert rates == [MovingShapes(fps=(1, 2, 4)).sample(i).fps for i in range(60)]


@pytest.mark.parametrize("fps", [1.0, 2.0, 4.0])
def test_appear_answers_agree_with_the_pixels(fps):
    world = MovingShapes(seed=1, kinds=("appear",), fps=(fps,))
    seconds = set()
    for i in range(N):
        clip = world.sample(i)
        (question, answer), = clip.qa
        still, target = clip.tracks
        assert question == f"at what second did the {target.name} appear?" and answer == str(target.appear)
        seconds.add(target.appear)
        for t, frame in zip(clip.times, clip.frames):
            assert _mask(frame, still.fill).any()  # the other shape is there from the start
            assert _mask(frame, target.fill).any() == (t >= int(answer)), (i, t)
        assert 0 <= int(answer) < clip.duration
    assert len(seconds) >= 6  # the answers spread over the seconds of the clips


def test_move_answers_agree_with_the_pixels():
    world = MovingShapes(seed=2, kinds=("move",), fps=(2.0,))
    went = set()
    for i in range(N):
        clip = world.sample(i)
        (q1, moved), (q2, direction) = clip.qa
        mover, still = clip.tracks
        assert q1 == "what moved?" and moved == mover.name and q2 == f"where did the {moved} go?"
        first, last = clip.frames[0], clip.frames[-1]
        step = _centroid(last, mover.fill) - _centroid(first, mover.fill)  # (dx, dy), image y downwards
        axis = 0 if direction in ("left", "right") else 1
        sign = -1 if direction in ("left", "up") else 1
        assert sign * step[axis] > 0.25 * world.frame_size, (i, direction, step)
        assert abs(step[1 - axis]) < 1.0
        # the other object does not move, and the two never overlap
        assert np.array_equal(_mask(first, still.fill), _mask(last, still.fill))
        for frame in clip.frames:
            assert _mask(frame, mover.fill).any() and _mask(frame, still.fill).any()
        went.add(direction)
    assert went == set(DIRECTIONS)


def test_splits_keep_the_held_out_combinations():
    train = MovingShapes(split="train")
    heldout = MovingShapes(split="heldout")
    for i in range(N):
        assert all((t.color, t.shape) not in HELD_OUT for t in train.sample(i).tracks)
        assert all((t.color, t.shape) in HELD_OUT for t in heldout.sample(i).tracks)
        tracks = train.sample(i).tracks
        assert tracks[0].color != tracks[1].color  # a color alone names each object


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split must be"),
    ({"duration": 1}, "duration must be"),
    ({"duration": (6, 4)}, "duration must be"),
    ({"fps": ()}, "fps must be"),
    ({"fps": (0,)}, "fps must be"),
    ({"fps": (1000,)}, "fps must be"),
    ({"kinds": ("spin",)}, "kinds must be"),
    ({"frame_size": 8}, "frame_size must be"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MovingShapes(**kwargs)
