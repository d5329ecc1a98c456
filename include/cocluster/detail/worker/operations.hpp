// The initiations of this_worker's asynchronous operations, one each, as Asio writes its own
// (asio/impl/read.hpp's initiate_async_read_buffer_sequence): this_worker.hpp passes them to
// asio::async_initiate with the caller's completion token. Each runs on the runtime's
// executor (run_on), completes at once what is ready (complete_now: a coroutine resumes
// without a trip through the scheduler, any other handler is posted), and parks the rest.
#pragma once

#include <asio/async_result.hpp>

#include "cocluster/detail/completion.hpp"
#include "cocluster/detail/worker/listen_target.hpp"
#include "cocluster/detail/worker/runtime.hpp"
#include "cocluster/server.hpp"

namespace cocluster::detail::worker {

// this_worker.send(): void(std::error_code), once the message is queued.
struct initiate_send {
  runtime* r;

  template <class Handler>
  void operator()(Handler&& handler, ipc::Envelope envelope) const {
    run_on(r->executor(), std::forward<Handler>(handler), [r = r, e = std::move(envelope)](auto h) mutable {
      std::error_code ec;
      if (r->channel().try_send(e, ec)) return complete_now(std::move(h), r->executor(), ec);
      r->channel().async_send(std::move(e), std::move(h));  // the send queue is full: wait for room
    });
  }
};

// this_worker.receive(): void(std::error_code, Message).
struct initiate_receive {
  runtime* r;

  template <class Handler>
  void operator()(Handler&& handler) const {
    run_on(r->executor(), std::forward<Handler>(handler), [r = r](auto h) {
      if (auto m = r->messages().try_pop()) return complete_now(std::move(h), r->executor(), std::error_code{}, std::move(*m));
      r->messages().async_pop(std::move(h));
    });
  }
};

// this_worker.disconnected(): void(std::error_code).
struct initiate_disconnected {
  runtime* r;

  template <class Handler>
  void operator()(Handler&& handler) const {
    run_on(r->executor(), std::forward<Handler>(handler), [r = r](auto h) { r->disconnected().async_wait(std::move(h)); });
  }
};

// this_worker.listen() and listen_fd(): void(std::error_code, Server<Protocol>).
template <class Protocol>
struct initiate_listen {
  runtime* r;

  template <class Handler>
  void operator()(Handler&& handler, listen_target t, ListenOptions options) const {
    run_on(r->executor(), std::forward<Handler>(handler), [r = r, t = std::move(t), options](auto h) mutable {
      r->template query_server<Protocol>(std::move(t), options, std::move(h));
    });
  }
};

}  // namespace cocluster::detail::worker
