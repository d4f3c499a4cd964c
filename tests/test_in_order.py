"""Batches run a few at a time and taken back in the order sent (`in_order`): the scheduler under the
detect command line and the stream scheduler."""

from __future__ import annotations

import threading
import time

from mtcnn_jax.images import ImageError
from mtcnn_jax.in_order import InOrder, failed_images


def test_results_come_back_in_the_order_sent_whatever_finishes_first():
    with InOrder(3, "test") as pool:
        for k, delay in enumerate([0.3, 0.0, 0.1]):
            pool.submit(k, lambda k, d: time.sleep(d) or k * 10, k, delay)
        assert list(pool.done()) == [(0, 0, None), (1, 10, None), (2, 20, None)]
        assert len(pool) == 0


def test_done_waits_only_while_more_than_depth_are_out():
    release = threading.Event()
    with InOrder(2, "test") as pool:
        pool.submit("slow", release.wait)
        pool.submit("quick", lambda: "q")
        assert list(pool.done(depth=2)) == [] and len(pool) == 2  # the oldest runs: nothing to take, no wait
        release.set()
        assert [tag for tag, _, _ in pool.done(depth=1)] == ["slow", "quick"]  # the oldest waited for, then done


def test_a_call_that_raises_comes_back_as_its_error():
    with InOrder(1, "test") as pool:
        pool.submit("bad", lambda: 1 / 0)
        pool.submit("good", lambda: "fine")
        (tag, result, err), after = list(pool.done())
        assert tag == "bad" and result is None and isinstance(err, ZeroDivisionError)
        assert after == ("good", "fine", None)


def test_failed_images_name_each_image_and_the_cause():
    errors = failed_images(["a.jpg", "b.jpg"], MemoryError("out of memory\nmore detail"))
    assert all(isinstance(e, ImageError) for e in errors)
    assert str(errors[1]) == ("b.jpg: detection failed (MemoryError: out of memory); set MTCNN_JAX_TRACEBACK=1 "
                              "and run it alone to see why")
