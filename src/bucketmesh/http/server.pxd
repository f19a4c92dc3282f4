# Types for the Cython build of server.py (docs/build.md): the .py is the source of the
# semantics; this file only says which attributes of _Connection are C fields of which
# type (every value assigned to them in server.py has that type), so the build reads them
# without a dictionary or descriptor lookup.
import cython

cdef class Response:
    cdef public object status, body, content_type, head, _headers

cdef class _Slot:
    cdef public object ready, keep_alive, head, http10, task

cdef class _Connection:
    cdef public object _server, _loop, _limits, _handler, _transport, _parser
    cdef public object _peer_names, _body, _timer, _pending, _deferred
    cdef public str _client_ip, _method, _http_version
    cdef public bytes _url
    cdef public dict _headers, _values
    cdef public str _length_text
    cdef public list _out
    cdef public Py_ssize_t _max_pipelined, _max_head, _max_fields, _out_size
    cdef public Py_ssize_t _head_raw, _head_room, _fields_left, _length
    cdef public double _keepalive, _now, _head_started, _body_started, _linger_until
    cdef public double _paused_at, _deadline, _timer_at
    cdef public bint _in_message, _in_target, _head_done, _keep_alive, _plain, _closing
    cdef public bint _failed, _lingering, _lost, _peer_eof, _write_paused, _reading_paused
    cdef public bint _shedding
    cdef public list _lines
    cdef public Py_ssize_t _at
    cdef public bytes _method_raw

    @cython.locals(now=double, shedding=bint, out=list, written=bytes)
    cpdef data_received(self, bytes data)

    cpdef on_url(self, bytes url)

    @cython.locals(room=Py_ssize_t, left=Py_ssize_t, key=str, text=str, headers=dict, names=dict, values=dict, known=tuple, at=Py_ssize_t, lines=list, line=tuple)
    cpdef on_header(self, bytes name, bytes value)

    @cython.locals(headers=dict, method=bytes, keep_alive=bint, methods=dict)
    cpdef on_headers_complete(self)

    @cython.locals(url=bytes, path=str, query=dict, paths=dict)
    cpdef on_message_complete(self)

    @cython.locals(data=bytes, response=Response)
    cpdef _deliver(self, result, bint keep_alive, bint head, bint http10)

    @cython.locals(lines=bytes, status_line=bytes, status_lines=dict)
    cdef bytes _encoded(self, Response response)

    @cython.locals(slot=_Slot, pending=object)
    cpdef _await_response(self, result, bint keep_alive, bint head, bint http10)

    cpdef _on_response_done(self, _Slot slot, task)

    @cython.locals(slot=_Slot, pending=object)
    cpdef _await_later(self, Later later, bint keep_alive, bint head, bint http10)

    cpdef _on_later(self, _Slot slot, ready)

    @cython.locals(pending=object, data=bytes, response=Response, now=double, deadline=double)
    cpdef _answered(self, _Slot slot, Response ready)

cdef class Later:
    cdef public _Connection _connection
    cdef public _Slot _slot
    cdef public object _ready
    cdef public bint cancelled

    @cython.locals(connection=_Connection)
    cpdef resolve(self, response)

    @cython.locals(connection=_Connection, slot=_Slot)
    cpdef follow(self, answer)

    @cython.locals(connection=_Connection, slot=_Slot)
    cpdef bint cancel(self)
