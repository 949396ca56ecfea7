/*! chatkit-secret.js: fetch ChatKit client secrets from a chatkit-flask endpoint. No dependencies.
 *
 * Plain script:  <script src="/api/chatkit/static/chatkit-secret.js"></script>
 *                const getClientSecret = ChatKitSecret.createClientSecretFetcher();
 *                chatkitElement.setOptions({ api: { getClientSecret } });
 * CommonJS:      const { createClientSecretFetcher } = require("./chatkit-secret.js");
 * ES module:     import { createClientSecretFetcher } from "./chatkit-secret.mjs";
 *
 * getClientSecret(currentClientSecret) ALWAYS mints a new secret: ChatKit calls it on mount and
 * again before the current secret expires, and returning the old one would never refresh it.
 */
(function (root, factory) {
  "use strict";
  // Served by the extension at {CHATKIT_URL_PREFIX}/static/: the endpoint is next to it.
  var script = typeof document !== "undefined" && document.currentScript;
  var api = factory(root, script && script.src);
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  }
  if (root) {
    root.ChatKitSecret = api;
  }
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this, function (root, scriptUrl) {
  "use strict";
  var DEFAULT_ENDPOINT = defaultEndpoint(scriptUrl);

  // --- shared core: keep identical to chatkit-secret.mjs (a test compares them) ---
  var RETRY_STATUSES = [503, 504];

  /** An error from the secret endpoint: .status (0 = no answer), .code, .retryAfter (seconds or
   *  null), .requestId (quote it to the site owner) and a message fit to show to a visitor. */
  class ChatKitSecretError extends Error {
    constructor(message, details) {
      super(message);
      var d = details || {};
      this.name = "ChatKitSecretError";
      this.status = typeof d.status === "number" ? d.status : 0;
      this.code = d.code || "error";
      this.retryAfter = typeof d.retryAfter === "number" ? d.retryAfter : null;
      this.requestId = d.requestId || null;
      if (d.cause !== undefined) {
        this.cause = d.cause;
      }
    }
  }

  function seconds(n) {
    return n === 1 ? "1 second" : n + " seconds";
  }

  /** Retry-After as whole seconds (delta-seconds or HTTP date), or null. */
  function parseRetryAfter(value) {
    if (value === null || value === undefined || value === "") {
      return null;
    }
    var text = String(value).trim();
    if (/^\d+(\.\d+)?$/.test(text)) {
      return Math.max(0, Math.ceil(Number(text)));
    }
    var date = Date.parse(text);
    if (!isNaN(date)) {
      return Math.max(0, Math.ceil((date - Date.now()) / 1000));
    }
    return null;
  }

  function sleep(ms) {
    return new Promise(function (resolve) {
      setTimeout(resolve, ms);
    });
  }

  async function readJson(response) {
    try {
      var text = await response.text();
      var data = text ? JSON.parse(text) : null;
      return data && typeof data === "object" ? data : null;
    } catch (_err) {
      return null;
    }
  }

  function retryAfterOf(response, payload) {
    if (payload && typeof payload.retry_after === "number" && payload.retry_after >= 0) {
      return Math.ceil(payload.retry_after);
    }
    return parseRetryAfter(response.headers && response.headers.get("Retry-After"));
  }

  function defaultMessage(status) {
    if (status === 503) return "The chat service is busy. Try again shortly.";
    if (status === 504) return "The chat service did not answer in time. Try again shortly.";
    if (status === 403) return "This page may not start a chat.";
    if (status >= 500) return "The chat service is unavailable. Try again later.";
    return "Could not start the chat (HTTP " + status + ").";
  }

  /**
   * Returns `async getClientSecret(currentClientSecret)` for ChatKit's `api: { getClientSecret }`.
   *
   * Options:
   *   endpoint        URL of the secret endpoint (default: "secret" beside the prefix this
   *                   file was served from, e.g. "/api/chatkit/secret")
   *   fetch           fetch implementation (default the global fetch)
   *   retries         extra attempts after a 503/504 or a network error (default 2)
   *   backoffMs       first backoff; doubles each retry, with jitter (default 500)
   *   maxRetryDelayMs longest wait before a retry (default 8000); a Retry-After longer than this
   *                   is not waited for: the error is thrown with .retryAfter instead
   *   body            JSON body (object, or a function returning one), e.g. { workflow_id }
   *   credentials     fetch credentials mode (default "same-origin"; "include" cross-origin)
   *   headers         extra request headers (object)
   *   timeoutMs       per-attempt timeout (default 20000; 0 disables)
   *   onSecret        called with { clientSecret, expiresAt, expiresAfter, refresh } per mint
   */
  function createClientSecretFetcher(options) {
    var opts = options || {};
    var endpoint = opts.endpoint || DEFAULT_ENDPOINT;
    var fetchImpl =
      opts.fetch ||
      function (url, init) {
        return root.fetch(url, init);
      };
    var retries = typeof opts.retries === "number" && opts.retries >= 0 ? opts.retries : 2;
    var backoffMs = typeof opts.backoffMs === "number" && opts.backoffMs >= 0 ? opts.backoffMs : 500;
    var maxRetryDelayMs = typeof opts.maxRetryDelayMs === "number" ? opts.maxRetryDelayMs : 8000;
    var credentials = opts.credentials || "same-origin";
    var timeoutMs = typeof opts.timeoutMs === "number" ? opts.timeoutMs : 20000;
    var onSecret = typeof opts.onSecret === "function" ? opts.onSecret : null;

    function backoff(attempt) {
      var base = backoffMs * Math.pow(2, attempt);
      return Math.min(maxRetryDelayMs, Math.round(base * (0.8 + Math.random() * 0.4)));
    }

    async function post() {
      var body = typeof opts.body === "function" ? await opts.body() : opts.body;
      var headers = { "Content-Type": "application/json", Accept: "application/json" };
      var extra = opts.headers || {};
      for (var name in extra) {
        if (Object.prototype.hasOwnProperty.call(extra, name)) {
          headers[name] = extra[name];
        }
      }
      var init = {
        method: "POST",
        credentials: credentials,
        cache: "no-store",
        headers: headers,
        body: JSON.stringify(body || {}),
      };
      var timer = null;
      if (timeoutMs > 0 && typeof AbortController === "function") {
        var controller = new AbortController();
        init.signal = controller.signal;
        timer = setTimeout(function () {
          controller.abort();
        }, timeoutMs);
      }
      try {
        return await fetchImpl(endpoint, init);
      } finally {
        if (timer !== null) {
          clearTimeout(timer);
        }
      }
    }

    // currentClientSecret is deliberately NOT returned: a refresh must mint a new secret.
    return async function getClientSecret(currentClientSecret) {
      var refresh = currentClientSecret !== null && currentClientSecret !== undefined;
      for (var attempt = 0; ; attempt++) {
        var response;
        try {
          response = await post();
        } catch (err) {
          if (attempt < retries) {
            await sleep(backoff(attempt));
            continue;
          }
          throw new ChatKitSecretError(
            "Could not reach the chat server. Check your connection and try again.",
            { status: 0, code: "network_error", cause: err }
          );
        }
        var payload = await readJson(response);
        var requestId =
          (payload && payload.request_id) ||
          (response.headers && response.headers.get("X-Request-ID")) ||
          null;
        if (response.ok) {
          var secret = payload && payload.client_secret;
          if (typeof secret !== "string" || !secret) {
            throw new ChatKitSecretError("The chat server answered without a client secret.", {
              status: response.status,
              code: "invalid_response",
              requestId: requestId,
            });
          }
          if (onSecret) {
            try {
              onSecret({
                clientSecret: secret,
                expiresAt: payload.expires_at,
                expiresAfter: payload.expires_after,
                refresh: refresh,
              });
            } catch (_err) {
              // an observer's bug must not break the chat
            }
          }
          return secret;
        }
        var status = response.status;
        var code = (payload && typeof payload.error === "string" && payload.error) || "http_" + status;
        var retryAfter = retryAfterOf(response, payload);
        if (status === 429) {
          throw new ChatKitSecretError(
            retryAfter !== null
              ? "Too many chat sessions. Try again in " + seconds(Math.max(1, retryAfter)) + "."
              : "Too many chat sessions. Try again later.",
            { status: status, code: code, retryAfter: retryAfter, requestId: requestId }
          );
        }
        if (RETRY_STATUSES.indexOf(status) !== -1 && attempt < retries) {
          var wait = retryAfter !== null ? retryAfter * 1000 : backoff(attempt);
          if (wait <= maxRetryDelayMs) {
            await sleep(wait);
            continue;
          }
        }
        var message = (payload && typeof payload.message === "string" && payload.message) || defaultMessage(status);
        throw new ChatKitSecretError(message, {
          status: status,
          code: code,
          retryAfter: retryAfter,
          requestId: requestId,
        });
      }
    };
  }
  /** "{prefix}/secret" when this file was loaded from "{prefix}/static/", else the default. */
  function defaultEndpoint(url) {
    var match = typeof url === "string" && /^(.*)\/static\/chatkit-secret\.m?js(?:[?#].*)?$/.exec(url);
    return match ? match[1] + "/secret" : "/api/chatkit/secret";
  }
  // --- end of shared core ---

  return {
    createClientSecretFetcher: createClientSecretFetcher,
    ChatKitSecretError: ChatKitSecretError,
    parseRetryAfter: parseRetryAfter,
  };
});
