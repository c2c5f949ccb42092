"""Python 3.11 compatibility shims for micro-framework 2.0.16's dependency set.

Installed by the microfw test harness into the micro-framework venv's
site-packages together with `microfw_py311_fixes.pth` (which imports this
module at interpreter start-up, before any user code can import kombu).
It is never used outside that venv and does not touch micro_framework itself.

1. vine 1.3.0 imports `inspect.formatargspec` and kombu 4.6 calls
   `inspect.getargspec`; both were removed in Python 3.11. They are restored
   (copied from the Python 3.10 standard library) when missing.
2. websockets 8.1 passes `loop=` to `asyncio.Lock`, `asyncio.sleep`,
   `asyncio.wait` and `asyncio.wait_for`; Python 3.10 removed that parameter.
   The four are wrapped to accept and drop `loop`.
"""

import asyncio
import collections
import functools
import inspect
import sys


def _formatargspec(args, varargs=None, varkw=None, defaults=None,
                   kwonlyargs=(), kwonlydefaults={}, annotations={},
                   formatarg=str,
                   formatvarargs=lambda name: "*" + name,
                   formatvarkw=lambda name: "**" + name,
                   formatvalue=lambda value: "=" + repr(value),
                   formatreturns=lambda text: " -> " + text,
                   formatannotation=inspect.formatannotation):
    def formatargandannotation(arg):
        result = formatarg(arg)
        if arg in annotations:
            result += ": " + formatannotation(annotations[arg])
        return result

    specs = []
    if defaults:
        firstdefault = len(args) - len(defaults)
    for i, arg in enumerate(args):
        spec = formatargandannotation(arg)
        if defaults and i >= firstdefault:
            spec = spec + formatvalue(defaults[i - firstdefault])
        specs.append(spec)
    if varargs is not None:
        specs.append(formatvarargs(formatargandannotation(varargs)))
    elif kwonlyargs:
        specs.append("*")
    for kwonlyarg in kwonlyargs or ():
        spec = formatargandannotation(kwonlyarg)
        if kwonlydefaults and kwonlyarg in kwonlydefaults:
            spec += formatvalue(kwonlydefaults[kwonlyarg])
        specs.append(spec)
    if varkw is not None:
        specs.append(formatvarkw(formatargandannotation(varkw)))
    result = "(" + ", ".join(specs) + ")"
    if "return" in annotations:
        result += formatreturns(formatannotation(annotations["return"]))
    return result


_ArgSpec = collections.namedtuple("ArgSpec", "args varargs keywords defaults")


def _getargspec(func):
    spec = inspect.getfullargspec(func)
    if spec.kwonlyargs or spec.annotations:
        raise ValueError(
            "Function has keyword-only parameters or annotations, use "
            "inspect.signature() API which can support them"
        )
    return _ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)


def _drop_loop(fn):
    @functools.wraps(fn)
    def wrapper(*args, loop=None, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__microfw_drop_loop__ = True
    return wrapper


class _Lock(asyncio.Lock):
    """asyncio.Lock that accepts and ignores the removed `loop` argument."""

    def __init__(self, *, loop=None):
        super().__init__()


def apply():
    if not hasattr(inspect, "formatargspec"):
        inspect.formatargspec = _formatargspec
    if not hasattr(inspect, "getargspec"):
        inspect.getargspec = _getargspec
    if sys.version_info >= (3, 10) and not hasattr(asyncio.sleep, "__microfw_drop_loop__"):
        asyncio.Lock = _Lock
        for name in ("sleep", "wait", "wait_for"):
            setattr(asyncio, name, _drop_loop(getattr(asyncio, name)))


apply()
