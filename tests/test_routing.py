"""Specification of request routing (kproxy/routing.py): (Host, path, method) -> api.

The rules are the contract's: segment-wise prefix matching, longest path wins, exact beats
prefix at equal length, exact host beats ``*.wildcard`` beats any host, 404/405.
"""

from __future__ import annotations

import pytest

from kproxy.routing import MethodNotAllowed, NoRoute, Router, normalize_host


def router(*routes: tuple[str, str, str, object, str]) -> Router:
    """A router from (host, path, match, methods, target) tuples."""
    r = Router()
    for host, path, match, methods, target in routes:
        r.add(host, path, match, methods, target=target)
    return r


# -- prefix matching on whole segments --

@pytest.mark.parametrize("path", ["/v1/anything", "/v1/anything/", "/v1/anything/x",
                                  "/v1/anything/x/y/z"])
def test_prefix_matches_the_path_itself_and_everything_below_it(path):
    r = router(("sd.httpbin.org", "/v1/anything", "prefix", None, "anything"))
    assert r.match("sd.httpbin.org", path, "GET") == "anything"


@pytest.mark.parametrize("path", ["/v1/anythingelse", "/v1/anything-else", "/v1/anythin", "/v1",
                                  "/v2/anything"])
def test_prefix_never_matches_a_longer_segment_or_another_path(path):
    r = router(("sd.httpbin.org", "/v1/anything", "prefix", None, "anything"))
    with pytest.raises(NoRoute):
        r.match("sd.httpbin.org", path, "GET")


def test_prefix_with_a_trailing_slash_matches_the_same_paths():
    r = router(("", "/v1/", "prefix", None, "v1"))
    for path in ("/v1", "/v1/", "/v1/x"):
        assert r.match("h", path, "GET") == "v1"
    with pytest.raises(NoRoute):
        r.match("h", "/v10", "GET")


def test_root_prefix_catches_every_path():
    r = router(("", "/", "prefix", None, "root"))
    for path in ("/", "/a", "/a/b/c", "/v1/anythingelse", "/%41"):
        assert r.match("example.org", path, "GET") == "root"


def test_exact_matches_only_the_path_itself():
    r = router(("", "/v1/status", "exact", None, "status"))
    assert r.match("h", "/v1/status", "GET") == "status"
    for path in ("/v1/status/x", "/v1/statuses", "/v1"):
        with pytest.raises(NoRoute):
            r.match("h", path, "GET")


def test_exact_does_not_match_the_path_with_a_trailing_slash():
    r = router(("", "/v1/status", "exact", None, "status"), ("", "/", "prefix", None, "root"))
    assert r.match("h", "/v1/status", "GET") == "status"
    assert r.match("h", "/v1/status/", "GET") == "root"


# -- which route wins --

def test_longest_matching_path_wins():
    r = router(("", "/", "prefix", None, "root"),
               ("", "/v1", "prefix", None, "v1"),
               ("", "/v1/anything/deep", "prefix", None, "deep"),
               ("", "/v1/anything", "prefix", None, "anything"))
    assert r.match("h", "/v1/anything/deep/x", "GET") == "deep"
    assert r.match("h", "/v1/anything/deeper", "GET") == "anything"
    assert r.match("h", "/v1/anything", "GET") == "anything"
    assert r.match("h", "/v1/anythingelse", "GET") == "v1"
    assert r.match("h", "/v2", "GET") == "root"


def test_longest_path_wins_regardless_of_the_order_routes_were_added():
    forward = router(("", "/a", "prefix", None, "short"), ("", "/a/b", "prefix", None, "long"))
    backward = router(("", "/a/b", "prefix", None, "long"), ("", "/a", "prefix", None, "short"))
    for r in (forward, backward):
        assert r.match("h", "/a/b/c", "GET") == "long"
        assert r.match("h", "/a/c", "GET") == "short"


@pytest.mark.parametrize("order", ["prefix first", "exact first"])
def test_exact_beats_prefix_at_equal_length(order):
    routes = [("", "/v1/anything", "prefix", None, "prefix"), ("", "/v1/anything", "exact", None, "exact")]
    r = router(*(routes if order == "prefix first" else routes[::-1]))
    assert r.match("h", "/v1/anything", "GET") == "exact"
    assert r.match("h", "/v1/anything/x", "GET") == "prefix"


def test_longer_exact_beats_shorter_prefix_and_longer_prefix_beats_shorter_exact():
    r = router(("", "/a", "prefix", None, "a-prefix"), ("", "/a/b", "exact", None, "ab-exact"),
               ("", "/c", "exact", None, "c-exact"), ("", "/c/d", "prefix", None, "cd-prefix"))
    assert r.match("h", "/a/b", "GET") == "ab-exact"
    assert r.match("h", "/a/b/c", "GET") == "a-prefix"
    assert r.match("h", "/c/d", "GET") == "cd-prefix"
    assert r.match("h", "/c", "GET") == "c-exact"


# -- hosts --

def test_exact_host_beats_wildcard_beats_any_host():
    r = router(("", "/x", "prefix", None, "any"),
               ("*.example.org", "/x", "prefix", None, "wildcard"),
               ("api.example.org", "/x", "prefix", None, "exact"))
    assert r.match("api.example.org", "/x", "GET") == "exact"
    assert r.match("web.example.org", "/x", "GET") == "wildcard"
    assert r.match("example.com", "/x", "GET") == "any"


def test_host_routes_do_not_take_other_hosts():
    r = router(("api.example.org", "/x", "prefix", None, "exact"))
    for host in ("web.example.org", "example.org", "api.example.org.evil.com", "xapi.example.org"):
        with pytest.raises(NoRoute):
            r.match(host, "/x", "GET")


def test_wildcard_matches_exactly_one_label():
    r = router(("*.example.org", "/", "prefix", None, "wildcard"))
    assert r.match("a.example.org", "/", "GET") == "wildcard"
    assert r.match("a-b-1.example.org", "/", "GET") == "wildcard"
    for host in ("example.org", "a.b.example.org", "a.example.org.evil.com", "aexample.org"):
        with pytest.raises(NoRoute):
            r.match(host, "/", "GET")


@pytest.mark.parametrize("host", ["SD.HTTPBIN.ORG", "sd.httpbin.org:9080", "Sd.HttpBin.Org:443",
                                  "sd.httpbin.org."])
def test_host_header_with_port_upper_case_or_trailing_dot_matches(host):
    r = router(("sd.httpbin.org", "/v1", "prefix", None, "sd"))
    assert r.match(host, "/v1", "GET") == "sd"


def test_wildcard_host_ignores_port_and_case():
    r = router(("*.example.org", "/", "prefix", None, "wildcard"))
    assert r.match("API.Example.org:8443", "/", "GET") == "wildcard"


@pytest.mark.parametrize("host", [None, ""])
def test_absent_host_only_matches_any_host_routes(host):
    only_hosts = router(("sd.httpbin.org", "/", "prefix", None, "exact"),
                        ("*.httpbin.org", "/", "prefix", None, "wildcard"))
    with pytest.raises(NoRoute):
        only_hosts.match(host, "/", "GET")
    with_any = router(("sd.httpbin.org", "/", "prefix", None, "exact"),
                      ("", "/", "prefix", None, "any"))
    assert with_any.match(host, "/", "GET") == "any"


@pytest.mark.parametrize("host", ["[::1]", "[::1]:9080", "[FD00::7]:80", "127.0.0.1:9080"])
def test_ip_literal_hosts_match_any_host_routes(host):
    r = router(("sd.httpbin.org", "/", "prefix", None, "exact"), ("", "/", "prefix", None, "any"))
    assert r.match(host, "/", "GET") == "any"


def test_normalize_host():
    assert normalize_host("Sd.HttpBin.Org:9080") == "sd.httpbin.org"
    assert normalize_host("sd.httpbin.org.") == "sd.httpbin.org"
    assert normalize_host("[::1]:9080") == "[::1]"
    assert normalize_host("[FD00::7]") == "[fd00::7]"
    assert normalize_host(None) == ""
    assert normalize_host("") == ""


# -- methods --

def test_methods_none_allows_every_method():
    r = router(("", "/a", "prefix", None, "a"))
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"):
        assert r.match("h", "/a", method) == "a"


def test_route_allowing_get_also_allows_head():
    r = router(("", "/a", "prefix", ["GET"], "a"))
    assert r.match("h", "/a", "HEAD") == "a"


def test_method_not_allowed_lists_the_union_of_allowed_methods():
    r = router(("", "/a", "prefix", ["GET"], "a-get"),
               ("", "/a/b", "prefix", ["POST"], "ab-post"),
               ("", "/a/b", "exact", ["PUT", "PATCH"], "ab-put"))
    with pytest.raises(MethodNotAllowed) as info:
        r.match("h", "/a/b", "DELETE")
    assert info.value.allowed == ["GET", "HEAD", "PATCH", "POST", "PUT"]


def test_method_not_allowed_only_counts_routes_whose_path_matches():
    r = router(("", "/a", "exact", ["GET"], "a"), ("", "/b", "exact", ["POST"], "b"))
    with pytest.raises(MethodNotAllowed) as info:
        r.match("h", "/a", "DELETE")
    assert info.value.allowed == ["GET", "HEAD"]


def test_method_mismatch_falls_through_to_a_shorter_route_that_allows_it():
    r = router(("", "/api", "prefix", None, "api-any"),
               ("", "/api/admin", "prefix", ["GET"], "admin-read"))
    assert r.match("h", "/api/admin/users", "GET") == "admin-read"
    assert r.match("h", "/api/admin/users", "POST") == "api-any"


def test_method_mismatch_on_exact_falls_through_to_prefix_of_equal_length():
    r = router(("", "/a", "exact", ["GET"], "exact-get"), ("", "/a", "prefix", ["POST"], "prefix-post"))
    assert r.match("h", "/a", "GET") == "exact-get"
    assert r.match("h", "/a", "POST") == "prefix-post"


def test_same_path_with_disjoint_methods_routes_by_method():
    r = router(("", "/items", "prefix", ["GET"], "reader"), ("", "/items", "prefix", ["POST", "PUT"], "writer"))
    assert r.match("h", "/items/1", "GET") == "reader"
    assert r.match("h", "/items/1", "PUT") == "writer"


def test_no_route_when_nothing_matches():
    r = router(("sd.httpbin.org", "/v1", "prefix", None, "sd"))
    with pytest.raises(NoRoute):
        r.match("sd.httpbin.org", "/v2", "GET")
    with pytest.raises(NoRoute):
        Router().match("sd.httpbin.org", "/", "GET")


def test_router_counts_routes_not_rules():
    r = router(("", "/a", "prefix", None, "a"), ("", "/b", "exact", None, "b"))
    assert len(r) == 2


# -- scale --

def test_five_thousand_routes_still_match_correctly():
    r = Router()
    for i in range(5000):
        host = ("", f"h{i % 50}.example.org", f"*.w{i % 50}.example.org")[i % 3]
        r.add(host, f"/svc{i}/api", "prefix" if i % 2 else "exact", ["GET"] if i % 5 == 0 else None,
              target=i)
    assert len(r) == 5000
    for i in range(5000):
        host = ("anything.test", f"h{i % 50}.example.org:8080", f"x.w{i % 50}.example.org")[i % 3]
        path = f"/svc{i}/api" + ("/deeper/x" if i % 2 else "")
        assert r.match(host, path, "GET") == i
    # and the near misses still miss
    with pytest.raises(NoRoute):
        r.match("anything.test", "/svc0/api/x", "GET")       # exact route
    with pytest.raises(NoRoute):
        r.match("other.test", "/svc1/api", "GET")             # host route
    with pytest.raises(NoRoute):
        r.match("anything.test", "/svc3/apix", "GET")         # segment boundary
    with pytest.raises(MethodNotAllowed):
        r.match("anything.test", "/svc0/api", "POST")          # methods = GET


def test_first_matches_racing_from_many_threads_all_succeed():
    # a router built lazily must not fail when a burst of first requests races to build it
    import threading
    for _ in range(20):
        router = Router()
        for i in range(50):
            router.add(f"h{i}.test", f"/p{i}", "prefix", None, i)
        results, errors = [], []

        def hit(i: int) -> None:
            try:
                results.append(router.match(f"h{i}.test", f"/p{i}/x", "GET") == i)
            except Exception as e:  # noqa: BLE001 - any exception is the failure
                errors.append(e)
        threads = [threading.Thread(target=hit, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and results == [True] * 16


def test_random_host_headers_do_not_grow_the_router_without_bound():
    router = Router()
    router.add("", "/", "prefix", None, "any")
    for i in range(2000):
        assert router.match(f"scan{i}.example", "/x", "GET") == "any"
    assert len(router._adapters) <= 256


def test_remembered_matches_answer_as_the_map_does_and_are_forgotten_when_routes_change():
    r = router(("a.test", "/v1", "prefix", ["GET"], "get-v1"), ("a.test", "/v1", "prefix", ["POST"], "post-v1"))
    for _ in range(2):  # the second round is answered from memory
        assert r.match("a.test", "/v1/x", "GET") == "get-v1"
        assert r.match("a.test", "/v1/x", "POST") == "post-v1"
        with pytest.raises(MethodNotAllowed):
            r.match("a.test", "/v1/x", "DELETE")
        with pytest.raises(NoRoute):
            r.match("b.test", "/v1/x", "GET")
    r.add("a.test", "/v1/x", "exact", None, target="exact-x")
    assert r.match("a.test", "/v1/x", "GET") == "exact-x"


def test_many_different_paths_do_not_grow_the_memory_of_matches_without_bound():
    r = router(("", "/items", "prefix", None, "items"))
    for i in range(20_000):
        assert r.match("h", f"/items/{i}", "GET") == "items"
    assert len(r._matches) <= 4096
