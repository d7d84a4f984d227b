import dataclasses
import threading

import pytest
from PIL import Image

import dreamsketch.engine
from dreamsketch.engine import GenerationCancelled
from dreamsketch.gallery import GalleryError, meta_from_parameters, read_parameters
from dreamsketch.request import RequestError
from dreamsketch.studio import SHUTTING_DOWN, Studio, StudioBusy


@pytest.fixture
def studio(settings):
    return Studio(settings)


def test_generation_lands_in_the_gallery_with_its_parameters(studio):
    request = studio.parse({"prompt": "a fox", "negative_prompt": "blur", "seed": 11, "batch_size": 2}, "txt2img")
    result = studio.generate(request)
    assert [entry.meta.seed for entry in result.entries] == [11, 12]
    assert [entry.id for entry in studio.gallery.list()] == [result.entries[1].id, result.entries[0].id]
    image = Image.open(studio.gallery.folder / result.entries[0].file_name)
    meta = meta_from_parameters(read_parameters(image))
    assert meta == result.entries[0].meta
    assert (meta.prompt, meta.negative_prompt, meta.steps, meta.scheduler) == ("a fox", "blur", 4, "Euler a")


def test_refused_and_cancelled_requests_write_nothing(studio):
    with pytest.raises(RequestError):
        studio.parse({"prompt": "x", "steps": 0}, "txt2img")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        studio.generate(studio.parse({"prompt": "x"}, "txt2img"), cancel=cancel)
    assert studio.gallery.count() == 0 and list(studio.gallery.folder.glob("*.png")) == []


@pytest.mark.parametrize(
    "failure", [GalleryError("could not save image: No space left on device"), KeyboardInterrupt()]
)
def test_a_batch_is_saved_whole_or_not_at_all(studio, monkeypatch, failure):
    """A disk that fills up, or Ctrl-C in the CLI, at the third picture of a batch left the first two saved."""
    save = studio.gallery.save
    saved = []

    def save_two_then_fail(image, meta):
        if len(saved) == 2:
            raise failure
        saved.append(save(image, meta))
        return saved[-1]

    monkeypatch.setattr(studio.gallery, "save", save_two_then_fail)
    with pytest.raises(type(failure)):
        studio.generate(studio.parse({"prompt": "x", "batch_size": 4}, "txt2img"))
    assert len(saved) == 2
    assert studio.gallery.count() == 0 and list(studio.gallery.folder.glob("*.png")) == []


def test_a_batch_takes_back_only_its_own_pictures(studio, monkeypatch):
    """The take-back went by id: after the index was rebuilt (ids numbered anew), it deleted other people's pictures
    and kept its own; and a failed delete stopped it and hid the first error."""
    for _ in range(3):
        studio.generate(studio.parse({"prompt": "old"}, "txt2img"))
    studio.gallery.delete(studio.gallery.list()[-1].file_name)  # a gap in the ids, which a rebuild closes
    save, delete = studio.gallery.save, studio.gallery.delete
    others = studio.generate(studio.parse({"prompt": "someone else", "batch_size": 2}, "txt2img"))
    batch: list = []

    def save_two_then_fail(image, meta):
        if len(batch) == 2:
            studio.gallery.index_path.unlink()  # the index is lost: rebuilt from the PNGs, numbered anew
            studio.gallery.refresh()
            raise GalleryError("could not save image: No space left on device")
        batch.append(save(image, meta))
        return batch[-1]

    def first_removal_fails(file_name):
        monkeypatch.setattr(studio.gallery, "delete", delete)
        raise PermissionError("read-only for a moment")

    monkeypatch.setattr(studio.gallery, "save", save_two_then_fail)
    monkeypatch.setattr(studio.gallery, "delete", first_removal_fails)
    with pytest.raises(GalleryError, match="No space left on device"):
        studio.generate(studio.parse({"prompt": "mine", "batch_size": 3}, "txt2img"))
    left = {entry.file_name for entry in studio.gallery.list(limit=100)}
    assert {entry.file_name for entry in others.entries} <= left
    assert batch[0].file_name in left and batch[1].file_name not in left  # the first removal failed, the next ran
    assert [entry.meta.prompt for entry in studio.gallery.list(limit=100)].count("mine") == 1


def test_a_cancel_after_the_last_step_saves_nothing(studio, monkeypatch):
    cancel = threading.Event()
    decode = dreamsketch.engine.decode

    def cancelled_while_decoding(*args, **kwargs):
        cancel.set()
        return decode(*args, **kwargs)

    monkeypatch.setattr(dreamsketch.engine, "decode", cancelled_while_decoding)
    with pytest.raises(GenerationCancelled):
        studio.generate(studio.parse({"prompt": "x", "steps": 2}, "txt2img"), cancel=cancel)
    assert studio.gallery.count() == 0 and list(studio.gallery.folder.glob("*.png")) == []


@pytest.mark.parametrize("saved_before_the_cancel", [1, 3])
def test_a_cancel_while_saving_takes_back_what_was_saved(studio, monkeypatch, saved_before_the_cancel):
    """The browser said "Cancelled; nothing was saved." while the pictures went on into the gallery."""
    cancel, save, saved = threading.Event(), studio.gallery.save, []

    def cancelled_while_saving(image, meta):
        saved.append(save(image, meta))
        if len(saved) == saved_before_the_cancel:
            cancel.set()
        return saved[-1]

    monkeypatch.setattr(studio.gallery, "save", cancelled_while_saving)
    with pytest.raises(GenerationCancelled):
        studio.generate(studio.parse({"prompt": "x", "steps": 1, "batch_size": 3}, "txt2img"), cancel=cancel)
    assert len(saved) == saved_before_the_cancel
    assert studio.gallery.count() == 0 and list(studio.gallery.folder.glob("*.png")) == []


def test_shutting_down_cancels_running_and_waiting_requests_and_refuses_new_ones(studio):
    started, outcomes = threading.Event(), []

    def run(on_step=None):
        try:
            studio.generate(studio.parse({"prompt": "x", "steps": 50}, "txt2img"), on_step)
        except StudioBusy as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=run, args=(lambda step: started.set(),)), threading.Thread(target=run)]
    for thread in threads:
        thread.start()
    started.wait(30)
    while studio.pending < 2:
        threading.Event().wait(0.01)
    studio.shut_down()
    for thread in threads:
        thread.join(30)
    with pytest.raises(StudioBusy, match="shutting down"):
        studio.generate(studio.parse({"prompt": "x"}, "txt2img"))
    assert outcomes == [SHUTTING_DOWN] * 2 and studio.pending == 0 and studio.gallery.count() == 0


def test_busy_when_the_queue_is_full(settings):
    studio = Studio(dataclasses.replace(settings, queue_size=1))
    started, release = threading.Event(), threading.Event()

    def hold(step):
        started.set()
        release.wait(30)

    request = studio.parse({"prompt": "x", "steps": 2}, "txt2img")
    running = threading.Thread(target=studio.generate, args=(request, hold))
    running.start()
    started.wait(30)
    waiting = threading.Thread(target=studio.generate, args=(request,))
    waiting.start()
    while studio.pending < 2:
        threading.Event().wait(0.01)
    with pytest.raises(StudioBusy, match="^busy: 1 request is waiting for the device"):
        studio.generate(request)
    queued = threading.Thread(target=studio.generate, args=(request,), kwargs={"own_queue": True})
    queued.start()  # Gradio's events: bounded by Gradio's queue, not refused here
    while studio.pending < 3:
        threading.Event().wait(0.01)
    release.set()
    for thread in (running, waiting, queued):
        thread.join(30)
    assert studio.pending == 0 and studio.gallery.count() == 3


def test_requests_running_together_do_not_count_as_waiting(settings):
    """Busy counted each request of a running merged batch as waiting: with two running, one place fewer."""
    studio = Studio(dataclasses.replace(settings, queue_size=2))
    engine = studio.engine
    started, release = threading.Event(), threading.Event()

    def hold(step):
        started.set()
        release.wait(30)

    request = studio.parse({"prompt": "x", "steps": 2}, "txt2img")
    first = [threading.Thread(target=studio.generate, args=(request, hold)) for _ in range(2)]
    with engine.lock:
        for thread in first:
            thread.start()
        while len(engine._waiting) < 2:
            threading.Event().wait(0.01)
        with pytest.raises(StudioBusy, match="^busy: 2 requests are waiting for the device"):
            studio.generate(request)
    started.wait(30)  # the two run as one batch now
    later = [threading.Thread(target=studio.generate, args=(request,)) for _ in range(2)]
    for thread in later:
        thread.start()
    while studio.pending < 4:
        threading.Event().wait(0.01)
    with pytest.raises(StudioBusy, match="^busy: 2 requests are waiting for the device"):
        studio.generate(request)
    release.set()
    for thread in first + later:
        thread.join(30)
    assert studio.pending == 0 and studio.gallery.count() == 4


def test_models_and_status(studio):
    models = {m["id"]: m for m in studio.models()}
    assert models["tiny-demo"]["available"] and not models["uncached-hub"]["available"]
    status = studio.status()
    assert status["device"] == "cpu" and status["gpu"] is None and status["default_model"] == "tiny-demo"
    assert {"torch", "diffusers", "transformers", "gradio", "dreamsketch"} <= set(status["versions"])
