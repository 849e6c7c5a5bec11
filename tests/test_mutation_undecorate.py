"""scripts/mutation_test.py's `undecorate`: the rewrite that lets mutmut mutate decorated functions
must leave a module's behaviour, signatures and names as they were, and leave no decorated body.

(The mutation script is not part of CI; this checks its pure source transformation, no mutmut run.)
"""

import ast
import asyncio
import inspect
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from mutation_test import undecorate  # noqa: E402

SAMPLE = '''
import contextlib
import functools

EVENTS = []


def counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        EVENTS.append(("call", fn.__name__))
        return fn(*args, **kwargs)
    return wrapper


class triton:  # stands in for the real module: @triton.jit reads its function's source
    jit = staticmethod(lambda fn: fn)


@contextlib.contextmanager
def opened(name, *, fail_close=False):
    """Yield a handle; close it on the way out, also on an exception."""
    EVENTS.append(("open", name))
    try:
        yield name.upper()
    except KeyError:
        EVENTS.append(("swallowed", name))
    finally:
        EVENTS.append(("close", name))


@counted
def mixed(a, b=2, /, c=3, *rest, d, e=[], **more):
    e.append(a)
    return a, b, c, rest, d, len(e), more


@functools.lru_cache(maxsize=None)
def cached(n):
    EVENTS.append(("compute", n))
    return n * n


@counted
async def later(x, y=1):
    await asyncio.sleep(0)
    return x + y


@triton.jit
def kernel(x):
    return x + 1


class Base:
    def hello(self):
        return "base"


class Child(Base):
    def __init__(self):
        self._size = 1

    @property
    def size(self):
        """The size."""
        return self._size

    @size.setter
    def size(self, value):
        self._size = 2 * value

    @counted
    def hello(self, suffix="!"):
        return super().hello() + suffix

    @staticmethod
    def plain(x):
        return -x

    @contextlib.contextmanager
    def scope(self, tag):
        EVENTS.append(("enter", tag))
        yield self._size
        EVENTS.append(("exit", tag))
'''


def load(source: str) -> dict:
    namespace = {"asyncio": asyncio}
    exec(compile(source, "sample.py", "exec"), namespace)
    return namespace


def behaviour(ns: dict) -> list:
    """Every observable result of the sample, in order."""
    seen = []
    with ns["opened"]("a") as handle:
        seen.append(handle)
    with ns["opened"]("b"):
        raise KeyError("swallowed by the generator: thrown into it through the wrapper")
    with pytest.raises(ValueError):
        with ns["opened"]("c"):
            raise ValueError("passes through")
    seen.append(ns["mixed"](1, d=4))
    seen.append(ns["mixed"](1, 5, 6, 7, 8, d=9, e=[0], z=10))
    seen.append(ns["mixed"](2, d=4))  # the shared mutable default grew by one: len(e) == 2
    seen += [ns["cached"](3), ns["cached"](3), ns["cached"].cache_info().hits]
    seen.append(asyncio.run(ns["later"](2)))
    child = ns["Child"]()
    seen.append(child.size)
    child.size = 5
    seen += [child.size, child.hello(), child.hello("?"), ns["Child"].plain(3)]
    with child.scope("t") as size:
        seen.append(size)
    seen.append(ns["kernel"](1))
    return seen + list(ns["EVENTS"])


def test_undecorated_module_behaves_the_same_and_keeps_signatures():
    source, done = undecorate(SAMPLE)
    assert sorted(done) == ["Child.hello", "Child.scope", "Child.size", "Child.size", "cached", "later",
                            "mixed", "opened"]
    before, after = load(SAMPLE), load(source)
    assert behaviour(after) == behaviour(before)
    for name in ("opened", "mixed", "cached", "later"):
        assert inspect.signature(after[name]) == inspect.signature(before[name]), name
        assert after[name].__name__ == name and after[name].__doc__ == before[name].__doc__
    for name in ("hello", "scope"):
        assert inspect.signature(getattr(after["Child"], name)) == inspect.signature(
            getattr(before["Child"], name))
    assert after["Child"].size.__doc__ == "The size."
    assert inspect.iscoroutinefunction(after["_later__undecorated"])


def test_no_decorated_body_is_left_but_the_kept_ones():
    """mutmut mutates a function only without decorators (or with a lone staticmethod/classmethod):
    after the rewrite, every other decorated function is a forwarding wrapper, and the bodies moved
    to plain functions of the same scope."""
    tree = ast.parse(undecorate(SAMPLE)[0])
    scopes = [tree.body, *[s.body for s in tree.body if isinstance(s, ast.ClassDef)]]
    functions = [f for body in scopes for f in body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    bodies = {f.name for f in functions if f.name.endswith("__undecorated") or f.name.endswith("__undecorated_")}
    assert bodies == {"_opened__undecorated", "_mixed__undecorated", "_cached__undecorated",
                      "_later__undecorated", "_size__undecorated", "_size__undecorated_",
                      "_hello__undecorated", "_scope__undecorated"}
    for f in functions:
        if f.name in bodies:
            assert not f.decorator_list
        elif f.decorator_list and f.name not in ("plain", "kernel"):
            statements = [s for s in f.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            assert len(statements) == 1 and isinstance(statements[0], ast.Return), f.name
    kernel = next(f for f in functions if f.name == "kernel")
    assert ast.unparse(kernel.body[0]) == "return x + 1"  # Triton reads this source: left alone


@pytest.mark.parametrize("module, expected", [
    ("hierarchos/io.py", ["atomic_dir", "atomic_files", "path_lock"]),
    ("hierarchos/chat.py", ["ChatSession.reply"]),
])
def test_the_modules_decorated_functions_are_split(module, expected):
    source, done = undecorate((REPO / module).read_text())
    assert done == expected
    compile(source, module, "exec")
    for name in expected:
        assert f"def _{name.split('.')[-1]}__undecorated(" in source
