from conftest import finals


def test_trained_run_prints_every_final_line(trained_run):
    f = trained_run["finals"]
    assert set(f) == {"prequant", "roundtrip", "sliding", "ngram"}
    assert all(v["coverage"] == 1.0 for v in f.values())
