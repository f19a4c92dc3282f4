# Types for the Cython build of hot.py (docs/build.md): the .py is the source of the
# semantics; this file only says which attributes of RateHot are C fields of which type
# (every value hot.py assigns them has that type) and types a few locals.
import cython
from bucketmesh.http.server cimport Later

@cython.locals(small=cython.longlong, exact=double, limit=double)
cpdef bint below(number, bound)

@cython.locals(small=cython.longlong)
cpdef bytes ascii_digits(number)

cdef class RateHot:
    cdef public object app, handler, router, fallback, metrics, renderer, encode
    cdef public object capacity, rate, template, other, value
    cdef public object near, near_capacity, near_level, decider, into
    cdef public object request, tokens, given_key, given_rule, first, first_template, first_name
    cdef public dict routes, guards, decisions, responses, durations, state
    cdef public str rule, mode, key, header, rendered
    cdef public bytes key_json
    cdef public tuple head, body, allowed, answered

    @cython.locals(state=dict, method=str, path=str, started=double, headers=dict, found=tuple, route=str, guards=dict, later=Later)
    cpdef answer(self, request)

    @cython.locals(fields=tuple, decisions=dict, label=tuple)
    cpdef respond(self, decision, dict state)

    cpdef _remember(self, template, dict headers, str key)

    cpdef _counted(self, str route, answer, double started)

    @cython.locals(elapsed=double, histogram=object, responses=dict, answered=tuple, index=Py_ssize_t, bound=double)
    cpdef _observed(self, str route, response, double started)

    @cython.locals(body=tuple, head=tuple, digits=bytes, wait=bytes)
    cpdef granted(self, decision, tuple fields)

cdef class LaterRate:
    cdef public RateHot hot
    cdef public Later later
    cdef public str route
    cdef public double started
    cdef public bint finished

    cpdef bint done(self)

    @cython.locals(hot=RateHot, later=Later, state=dict)
    cpdef set_result(self, decision)

    cpdef set_exception(self, error)

    cpdef _handed(self, outcome, bint failed)

    @cython.locals(hot=RateHot, later=Later)
    cpdef _reference(self, future)

    @cython.locals(hot=RateHot)
    cpdef _after_barrier(self, barrier, response)

    cpdef _failed(self, error)
