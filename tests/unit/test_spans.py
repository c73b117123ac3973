import pytest

from molinkd.spans import (
    ServedSpan,
    Span,
    SpanError,
    check_chain,
    choose_span,
    coverage,
    even_split,
    parse_span,
    pipeline_placement,
    should_rebalance,
    span_length_for,
)

L = 30


@pytest.mark.parametrize(
    "text,expected",
    [
        ("0:15", Span(0, 15)),
        ("15:30", Span(15, 30)),
        (" 3:4 ", Span(3, 4)),
        ("0,14", Span(0, 15)),  # the reference's inclusive form
        ("15,29", Span(15, 30)),
        ("all", Span(0, 30)),
        ("ALL", Span(0, 30)),
        ("none", None),
        ("auto", "auto"),
    ],
)
def test_parse(text, expected):
    assert parse_span(text, L) == expected


@pytest.mark.parametrize("text", ["", "5", "a:b", "3:3", "4:2", "0:31", "-1:5", "5,3", "0,30", "1:2:3"])
def test_parse_rejects(text):
    with pytest.raises(SpanError):
        parse_span(text, L)


def test_all_needs_layer_count():
    with pytest.raises(SpanError):
        parse_span("all")
    assert parse_span("2:40") == Span(2, 40)  # no count: not validated


@pytest.mark.parametrize(
    "span,rank,size,partition",
    [
        (Span(0, 30), 0, 1, None),
        (Span(0, 15), 0, 2, "15,15"),
        (Span(15, 30), 1, 2, "15,15"),
        (Span(0, 10), 0, 2, "10,20"),
        (Span(10, 20), 1, 3, "10,10,10"),
        (Span(20, 30), 1, 2, "20,10"),
        (Span(1, 29), 1, 3, "1,28,1"),
    ],
)
def test_placement(span, rank, size, partition):
    p = pipeline_placement(span, L)
    assert (p.rank, p.size, p.partition) == (rank, size, partition)
    if partition:
        parts = [int(x) for x in partition.split(",")]
        assert sum(parts) == L and len(parts) == size
        # the owned part is exactly the span
        assert sum(parts[:rank]) == span.start and sum(parts[: rank + 1]) == span.end
        assert p.env() == {"VLLM_PP_LAYER_PARTITION": partition}


def test_check_chain_and_split():
    check_chain(even_split(L, 3), L)
    assert even_split(30, 4) == [Span(0, 8), Span(8, 16), Span(16, 23), Span(23, 30)]
    with pytest.raises(SpanError, match="gap or overlap"):
        check_chain([Span(0, 10), Span(11, 30)], L)
    with pytest.raises(SpanError, match="ends at layer"):
        check_chain([Span(0, 10)], L)


def test_choose_empty_swarm_starts_at_zero():
    assert choose_span([], L, 15) == Span(0, 15)


def test_choose_fills_largest_gap():
    table = [ServedSpan("a", 0, 10, 50.0), ServedSpan("b", 12, 15, 50.0), ServedSpan("c", 25, 30, 50.0)]
    # gaps: [10,12) and [15,25): the largest is chosen
    assert choose_span(table, L, 10) == Span(15, 25)
    assert choose_span(table, L, 4) == Span(15, 19)


def test_choose_covers_small_gap_with_bigger_span():
    table = [ServedSpan("a", 0, 14, 50.0), ServedSpan("b", 16, 30, 50.0)]
    sp = choose_span(table, L, 10)
    assert sp.start <= 14 and sp.end >= 16


def test_choose_strengthens_weakest_when_covered():
    table = [
        ServedSpan("a", 0, 15, 100.0),
        ServedSpan("b", 15, 30, 20.0),  # slow second half
        ServedSpan("c", 0, 30, 10.0),
    ]
    assert choose_span(table, L, 15) == Span(15, 30)


def test_choose_excludes_own_old_announcement():
    table = [ServedSpan("me", 0, 15, 50.0), ServedSpan("x", 0, 15, 50.0)]
    assert choose_span(table, L, 15, exclude_peer="me") == Span(15, 30)


def test_coverage_and_lengths():
    tp = coverage([ServedSpan("a", 0, 2, 1.0), ServedSpan("b", 1, 3, 2.0)], 4)
    assert tp == [1.0, 3.0, 2.0, 0.0]
    assert span_length_for(30, free_memory_bytes=10 * 100, bytes_per_layer=100) == 10
    assert span_length_for(30, max_layers=40) == 30
    with pytest.raises(SpanError):
        span_length_for(30, free_memory_bytes=10, bytes_per_layer=100)


def test_rebalance():
    table = [ServedSpan("a", 0, 15, 50.0), ServedSpan("b", 0, 15, 50.0), ServedSpan("me", 0, 15, 50.0)]
    assert should_rebalance(table, L, "me") == Span(15, 30)
    balanced = [ServedSpan("a", 0, 15, 50.0), ServedSpan("me", 15, 30, 50.0)]
    assert should_rebalance(balanced, L, "me") is None


def test_balanced_split_evens_out_measured_step_times():
    from molinkd.spans import balanced_split

    # the head measured slower per layer (it also schedules and serves the API): it gets fewer
    assert [(x.start, x.end) for x in balanced_split([(0, 15), (15, 30)], [28.3, 21.8])] == [(0, 13), (13, 30)]
    assert [(x.start, x.end) for x in balanced_split([(0, 15), (15, 30)], [20.0, 20.0])] == [(0, 15), (15, 30)]
    three = balanced_split([(0, 10), (10, 20), (20, 30)], [10.0, 10.0, 20.0])
    assert [(x.start, x.end) for x in three] == [(0, 12), (12, 24), (24, 30)]
    # the slowest stage of the result is no slower than any other split's slowest stage
    per_layer = [1.0, 1.0, 2.0]
    best = max(x.length * c for x, c in zip(three, per_layer))
    assert all(max(a * 1.0, b * 1.0, (30 - a - b) * 2.0) >= best for a in range(1, 29) for b in range(1, 30 - a))
    # every stage keeps a layer, however slow it measured
    assert [x.length for x in balanced_split([(0, 1), (1, 4)], [1000.0, 1.0])] == [1, 3]
    with pytest.raises(SpanError):
        balanced_split([(0, 15), (15, 30)], [20.0])
    with pytest.raises(SpanError):
        balanced_split([(0, 15), (15, 30)], [20.0, 0.0])
    with pytest.raises(SpanError):
        balanced_split([(0, 15), (16, 30)], [20.0, 20.0])
