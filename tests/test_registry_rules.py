"""The champion rule of pipeline.registry.models.promote on its own: versions registered by register_version on a
SQLite store (no model files needed: the rule reads only the versions' tags).

The rule through the register step, on logged models, is in tests/test_registry.py.
"""

from __future__ import annotations

import math

import pytest

from tests.test_registry import SET_A, SET_B, registry_env, write_evaluation


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds); each test uses its own model name."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("rules")
    with registry_env(root) as uri:
        yield MlflowClient(uri)


@pytest.fixture
def versions(store, request, tmp_path):
    """`new(metrics, test_set=SET_A) -> version` registering under a name of the test's own; `champion()`."""
    from pipeline.registry.models import register_version

    source = (tmp_path / "model").as_uri()  # the rule never opens it
    name = request.node.name
    mlflow_store = store

    def new(metrics: dict[str, float], test_set: str = SET_A) -> str:
        return str(register_version(mlflow_store, source, None, metrics, "", tags={"fusionnet.test_set": test_set},
                                    name=name).version)

    def champion() -> str:
        return str(mlflow_store.get_model_version_by_alias(name, "champion").version)

    return {"client": mlflow_store, "name": name, "new": new, "champion": champion}


def test_greater_is_better_and_a_version_without_the_metric(versions):
    from pipeline.registry.models import promote

    client, name, new = versions["client"], versions["name"], versions["new"]
    registered = [new({"score": v}) for v in (0.5, 0.7, 0.6)]
    decisions = [promote(client, v, "score", greater_is_better=True, name=name) for v in registered]
    assert [d.alias for d in decisions] == ["champion", "champion", "challenger"]
    assert versions["champion"]() == registered[1]
    no_metric = new({"other": 1.0})
    decision = promote(client, no_metric, "score", greater_is_better=True, name=name)
    assert (decision.alias, decision.compared) == ("challenger", False)
    assert decision.reason == f"v{no_metric} has no score, so @champion stays on v{registered[1]}"
    assert versions["champion"]() == registered[1]


def test_a_champion_without_the_metric_is_beaten_on_the_same_test_set(versions):
    """A champion registered without the compared metric (by hand, or before the metric existed) counts
    as beaten by a version that has it on the same test set; later versions are compared as usual."""
    from pipeline.registry.models import promote

    client, name, new, champion = versions["client"], versions["name"], versions["new"], versions["champion"]
    old = new({"other": 1.0})
    first = promote(client, old, "raw.band.sad", name=name)
    assert (first.alias, first.reason) == ("champion", f"no champion yet; v{old} has no raw.band.sad")
    better = new({"raw.band.sad": 0.3})
    decision = promote(client, better, "raw.band.sad", name=name)
    assert (decision.alias, decision.compared, decision.champion_version) == ("champion", True, old)
    assert math.isnan(decision.champion_value) and decision.reason == f"champion v{old} has no raw.band.sad"
    assert champion() == better
    assert client.get_model_version(name, better).tags["fusionnet.promotion"] == decision.reason
    # from then on the champion has the metric: a worse version is challenger
    assert promote(client, new({"raw.band.sad": 0.4}), "raw.band.sad", name=name).alias == "challenger"
    # on another test set nothing is compared, whatever the numbers: the champion stays
    assert promote(client, new({"raw.band.sad": 0.01}, SET_B), "raw.band.sad", name=name).compared is False
    assert champion() == better


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_a_version_without_the_metric_never_takes_the_alias_from_a_champion(versions, greater_is_better):
    """Not from a champion that has the metric, nor from one that lacks it too (nothing ranks them), on the
    same test set or another; the reason names the version and the metric, and is kept as its tag."""
    from pipeline.registry.models import promote

    client, name, new, champion = versions["client"], versions["name"], versions["new"], versions["champion"]
    bare = new({"other": 1.0})
    promote(client, bare, "raw.band.sad", greater_is_better, name=name)
    for test_set in (SET_A, SET_B):  # the champion lacks the metric too
        second = new({"other": 0.5}, test_set)
        decision = promote(client, second, "raw.band.sad", greater_is_better, name=name)
        assert (decision.alias, decision.compared, decision.champion_version) == ("challenger", False, bare)
        assert decision.reason == f"v{second} has no raw.band.sad, so @champion stays on v{bare}"
        assert client.get_model_version(name, second).tags["fusionnet.promotion"] == decision.reason
        assert champion() == bare
    scored = new({"raw.band.sad": 0.3})
    assert promote(client, scored, "raw.band.sad", greater_is_better, name=name).alias == "champion"
    for test_set in (SET_A, SET_B):  # the champion has the metric
        later = new({"other": 0.1}, test_set)
        decision = promote(client, later, "raw.band.sad", greater_is_better, name=name)
        assert (decision.alias, decision.reason) == ("challenger", f"v{later} has no raw.band.sad, so @champion stays on v{scored}")
        assert decision.champion_value is None and champion() == scored


def test_a_metric_the_evaluation_lacks_is_an_error_naming_it(store, tmp_path, tiny_checkpoint):
    from pipeline.registry.registration import register_pipeline_model

    metrics, reports = write_evaluation(tmp_path / "bad-metric", 1.0)
    with pytest.raises(KeyError, match=r"'raw.band.nope' is not in .*bad-metric/metrics/evaluate.json"):
        register_pipeline_model({"register": {"metric": "raw.band.nope"}}, tiny_checkpoint, metrics, reports,
                                tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
