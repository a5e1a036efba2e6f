"""The reports people read: readable curve labels and axes, integer epochs, legends off the lines,
tables that say on how many images and at which eps."""
import pytest

from cure_fast import reporting


def test_metric_labels_are_readable():
    assert reporting.metric_label("test_certified_inf") == "test certified l∞"
    assert reporting.metric_label("test_pgd_2") == "test PGD l2"
    assert reporting.metric_label("train_correct") == "train clean"
    assert reporting.metric_label("test_union") == "test union (certified)"
    assert reporting.metric_label("eps_inf") == "eps l∞"
    assert reporting.metric_label("natural_train_loss") == "natural loss"


def test_curves_have_named_axes_integer_epochs_and_legends_below(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(reporting, "save_figure", lambda fig, path, **kw: figures.append(fig))
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_clean": 0.5, "test_certified_inf": 0.25, "eps_inf": 0.1,
                "train_certified_inf": 0.2} for e in range(1, 4)]
    reporting.plot_curves(history, str(tmp_path / "curves.png"))
    axes = figures[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["cross-entropy", "accuracy (%)", "eps (pixel space)"]
    figures[0].canvas.draw()
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        legend = ax.get_legend().get_window_extent()
        assert legend.y1 <= ax.get_window_extent().y0, "the legend sits below the plot, off the lines"
    assert "test certified l∞" in [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert max(max(line.get_ydata()) for line in axes[1].lines) == pytest.approx(50.0)  # percent


def test_plots_are_written_atomically(tmp_path):
    reporting.plot_summary({"run": {"clean": 0.5, "certified_inf": 0.25}}, str(tmp_path / "summary.png"),
                           title="on 8 images, l∞ eps 0.1")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.png"]
