"""Sparsity schedules: values at known points (worked out by hand), update steps, bad input."""
import pytest

from sparsesam.pruning import GradualCubic, Iterative, OneShot


def test_one_shot():
    s = OneShot(0.8, step=3)
    assert [s(t) for t in (0, 2, 3, 100)] == [0.0, 0.0, 0.8, 0.8]
    assert [s.is_update_step(t) for t in (2, 3, 4)] == [False, True, False]


def test_iterative_geometric_and_linear():
    s = Iterative(0.9, rounds=3, interval=10, start_step=5)
    # Each round keeps the same fraction of what is left: 1 - 0.1^(i/3).
    assert s(4) == 0.0
    assert s(5) == pytest.approx(1 - 0.1 ** (1 / 3)) == pytest.approx(0.535841, abs=1e-6)
    assert s(14) == s(5)
    assert s(15) == pytest.approx(0.784557, abs=1e-6)
    assert s(25) == 0.9 and s(1000) == 0.9
    assert [t for t in range(60) if s.is_update_step(t)] == [5, 15, 25]
    lin = Iterative(0.9, rounds=3, interval=10, spacing="linear")
    assert [lin(t) for t in (0, 10, 20, 30)] == pytest.approx([0.3, 0.6, 0.9, 0.9])


def test_gradual_cubic_zhu_gupta():
    s = GradualCubic(0.9, num_updates=10, frequency=100, start_step=1000)
    assert s(0) == 0.0 and s(999) == 0.0 and s(1000) == 0.0
    # Half-way: 0.9 + (0 - 0.9) * (1 - 0.5)^3 = 0.7875; it holds until the next update.
    assert s(1500) == pytest.approx(0.7875)
    assert s(1599) == pytest.approx(0.7875)
    assert s(1100) == pytest.approx(0.9 - 0.9 * 0.9 ** 3)  # = 0.2439
    assert s(2000) == pytest.approx(0.9) and s(10 ** 6) == pytest.approx(0.9)
    assert [t for t in range(0, 3000, 50) if s.is_update_step(t)] == list(range(1000, 2001, 100))
    # With an initial sparsity: s_t = s_f + (s_i - s_f)(1 - p)^3.
    g = GradualCubic(0.8, num_updates=4, frequency=1, initial_sparsity=0.2)
    assert [g(t) for t in range(5)] == pytest.approx([0.2, 0.8 - 0.6 * 0.75 ** 3, 0.8 - 0.6 * 0.125, 0.8 - 0.6 / 64, 0.8])
    values = [s(t) for t in range(0, 2100, 100)]
    assert values == sorted(values)  # never decreasing


def test_bad_arguments_name_the_argument():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="final_sparsity must be in"):
            OneShot(bad)
        with pytest.raises(ValueError, match="final_sparsity must be in"):
            GradualCubic(bad, num_updates=3)
    with pytest.raises(ValueError, match="initial_sparsity .* must not exceed final_sparsity"):
        GradualCubic(0.5, num_updates=3, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="num_updates must be >= 1"):
        GradualCubic(0.5, num_updates=0)
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        GradualCubic(0.5, num_updates=2, frequency=0)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        Iterative(0.5, rounds=0, interval=1)
    with pytest.raises(ValueError, match="spacing must be one of"):
        Iterative(0.5, rounds=2, interval=1, spacing="cubic")
    with pytest.raises(TypeError, match="interval must be an int"):
        Iterative(0.5, rounds=2, interval=1.5)
    with pytest.raises(ValueError, match="step must be >= 0"):
        OneShot(0.5, step=-1)
