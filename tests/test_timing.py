import subprocess
import sys
import time

import pytest

from gradcam_batch.timing import RunClock, process_age_seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_process_age_counts_time_before_our_code():
    # A child that sleeps before asking: its age must include the sleep.
    code = "import time; time.sleep(0.6); from gradcam_batch.timing import process_age_seconds as a; print(a())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.55 <= age < 30
    assert process_age_seconds() > 0


def test_steady_rate_leaves_out_the_warm_up():
    clock = RunClock()
    # 20 batches of 10 images: the first takes 5 s (start-up), the rest 0.1 s each
    times = [5.0 + 0.1 * i for i in range(20)]
    clock.started = 0.0
    clock._times, clock._images = [], []
    for t in times:
        clock._times.append(t)
        clock._images.append(10)
    assert clock.seconds_to_first_batch == pytest.approx(5.0)
    # skip = 2 batches; 18 batches of 10 images over times[-1] - times[1] = 1.8 s
    assert clock.steady_images_per_second == pytest.approx(180 / 1.8)
    assert clock.as_dict()["batches"] == 20


def test_too_few_batches_have_no_steady_rate():
    clock = RunClock()
    assert clock.seconds_to_first_batch is None and clock.steady_images_per_second is None
    clock.batch_done(4)
    time.sleep(0.01)
    clock.batch_done(4)
    assert clock.steady_images_per_second is None
    assert clock.seconds_to_first_batch > 0
    assert clock.as_dict()["steady_images_per_second"] is None
