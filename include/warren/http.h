/* HTTP(S) for jobs: warren.http makes a request with libcurl's multi-socket
 * interface driven by the loop, and the job waits without blocking it; any
 * number of jobs may have transfers in flight at once, all on the loop
 * thread. libcurl ("libcurl.so.4", Debian package libcurl4) is loaded on the
 * first call, so that a worker that never makes a request does not carry it.
 *
 * Ownership on the loop. This module owns, once the first request is made
 * and until wr_http_shutdown:
 *   - the one curl multi handle, which holds every transfer in flight and
 *     libcurl's cache of idle connections;
 *   - one ev_io per socket libcurl asks to watch (CURLMOPT_SOCKETFUNCTION):
 *     started, changed and stopped as libcurl says, and freed when it says
 *     CURL_POLL_REMOVE, which it does before it closes the socket;
 *   - its one ev_timer, set to the timeout libcurl asks for
 *     (CURLMOPT_TIMERFUNCTION): transfer timeouts and libcurl's own work.
 * Each transfer (an easy handle, its buffers and files) belongs to the job
 * that waits for it (WR_WAIT_HTTP). It ends in one of two ways: libcurl
 * reports it done and the job is resumed with the result (the loop, from the
 * socket's ev_io or the timer); or the job is interrupted or fails (forced
 * stage, --job-timeout, a lost connection), and the wait's cancel removes the
 * easy handle from the multi (libcurl closes its connection, and so stops
 * that socket's ev_io, without waiting for a name being resolved), closes
 * and removes the output file, closes the upload file and frees the buffers.
 * By wr_http_shutdown every job has ended, so only idle connections are
 * left, which it closes with the multi handle. */
#ifndef WARREN_HTTP_H
#define WARREN_HTTP_H

#include <lua.h>

/* Defaults of warren.http's options. */
#define WR_HTTP_TIMEOUT 30.0                /* seconds for the whole transfer */
#define WR_HTTP_CONNECT_TIMEOUT 10.0        /* at most, for the connection and TLS handshake */
#define WR_HTTP_MAX_BODY (64 * 1024 * 1024) /* bytes of a response body kept in memory */
#define WR_HTTP_MAX_REDIRS 10               /* with follow = true */

/* warren.http{method=, url=, headers=, body=, body_file=, output_file=,
 *             timeout=, max_body=, follow=, verify=, ca=} -> res | nil, err
 *
 * See docs/contract.md for the options, their defaults and the result. Bad
 * arguments, or a call outside a job's own coroutine or where it cannot
 * yield, raise an error before anything is started; a file that cannot be
 * opened, or a libcurl that cannot be loaded, gives nil, err without
 * yielding. Its upvalue is the vm (vm.h) whose context has the loop. */
int wr_http_lua(lua_State *L);

/* Frees the multi handle (closing its idle connections) and stops its
 * watchers. Call once every job has ended, before the loop is destroyed. */
void wr_http_shutdown(void);

#endif
