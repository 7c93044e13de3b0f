//! Authentication and permissions through the real proxy and Redis.

mod common;

use common::*;

#[test]
fn commands_before_auth_get_noauth() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    assert_eq!(
        c.cmd(&["GET", "k"]),
        b"-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(c.cmd(&["PING"]), b"-NOAUTH Authentication required.\r\n");
    assert_eq!(
        c.cmd(&["NOSUCHCOMMAND"]),
        b"-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
}

#[test]
fn two_argument_auth_logs_in_and_reaches_upstream() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));
}

#[test]
fn one_argument_auth_means_the_default_user() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    assert_eq!(c.cmd(&["AUTH", "default-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
}

#[test]
fn wrong_password_keeps_connection_open() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    let wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    assert_eq!(c.cmd(&["AUTH", "alice", "nope"]), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "nobody", "alice-pw"]), wrongpass);
    assert_eq!(c.cmd(&["AUTH", "wrong-default"]), wrongpass);
    assert_eq!(
        c.cmd(&["GET", "k"]),
        b"-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), b"$-1\r\n");
}

#[test]
fn hello_with_auth_logs_in_and_switches_to_resp3() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    let hello = c.cmd(&["HELLO", "3", "AUTH", "alice", "alice-pw", "SETNAME", "app1"]);
    assert!(
        hello.starts_with(b"%"),
        "RESP3 map expected, got {:?}",
        String::from_utf8_lossy(&hello)
    );
    assert!(hello.windows(5).any(|w| w == b"proto"));
    // RESP3 nulls from here on, for local and upstream replies alike.
    assert_eq!(c.cmd(&["GET", "missing"]), b"_\r\n");
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("app1"));
    assert_eq!(c.cmd(&["HELLO", "2"]).first(), Some(&b'*'));
    assert_eq!(c.cmd(&["GET", "missing"]), b"$-1\r\n");
}

#[test]
fn hello_without_auth_is_refused_and_wrong_credentials_get_wrongpass() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    assert!(
        c.cmd(&["HELLO", "3"])
            .starts_with(b"-NOAUTH HELLO must be called")
    );
    assert_eq!(
        c.cmd(&["HELLO", "3", "AUTH", "alice", "bad"]),
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        c.cmd(&["HELLO", "4"]),
        b"-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        c.cmd(&["HELLO", "2", "AUTH", "alice", "alice-pw"]).first(),
        Some(&b'*')
    );
    assert_eq!(c.cmd(&["PING"]), b"+PONG\r\n");
}

#[test]
fn read_users_can_read_but_not_write() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut writer = proxy.login(&ALICE);
    assert_eq!(writer.cmd(&["SET", "shared", "1"]), b"+OK\r\n");

    let mut reader = proxy.login(&READER);
    assert_eq!(reader.cmd(&["GET", "shared"]), bulk("1"));
    assert_eq!(
        reader.cmd(&["SET", "shared", "2"]),
        b"-NOPERM User reader has no permissions to run the 'set' command\r\n"
    );
    assert!(reader.cmd(&["DEL", "shared"]).starts_with(b"-NOPERM"));
    assert_eq!(reader.cmd(&["GET", "shared"]), bulk("1"));
}

#[test]
fn reauthenticating_moves_the_session_to_the_new_project() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "alice"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["AUTH", "bob", "bob-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), b"$-1\r\n");
    // A failed AUTH leaves the session as it was.
    assert!(c.cmd(&["AUTH", "alice", "bad"]).starts_with(b"-WRONGPASS"));
    assert_eq!(c.cmd(&["SET", "k", "bob"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("alice"));
}

#[test]
fn reset_logs_the_session_out() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.login(&ALICE);
    assert_eq!(c.cmd(&["SET", "k", "v"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["RESET"]), b"+RESET\r\n");
    assert_eq!(
        c.cmd(&["GET", "k"]),
        b"-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(c.cmd(&["AUTH", "alice", "alice-pw"]), b"+OK\r\n");
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v"));
}

#[test]
fn unauthenticated_clients_get_redis_size_limits() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let mut c = proxy.raw();
    c.send_bytes(b"*2\r\n$4\r\nAUTH\r\n$100000\r\n");
    assert_eq!(
        c.reply(),
        b"-ERR Protocol error: unauthenticated bulk length\r\n"
    );
    assert!(c.is_closed());
}

#[tokio::test]
async fn the_redis_crate_authenticates_through_its_url() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let client = redis::Client::open(proxy.url(&ALICE)).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg("greeting")
        .arg("hi")
        .query_async(&mut con)
        .await
        .unwrap();
    let got: String = redis::cmd("GET")
        .arg("greeting")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(got, "hi");

    let bad =
        redis::Client::open(format!("redis://alice:wrong@127.0.0.1:{}/", proxy.port)).unwrap();
    let Err(err) = bad.get_multiplexed_async_connection().await else {
        panic!("a wrong password must fail");
    };
    assert_eq!(err.kind(), redis::ErrorKind::AuthenticationFailed, "{err}");
}
