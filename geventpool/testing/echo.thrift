// The service geventpool's tests, demo and load tests run against.

exception Refused {
  1: string reason
}

// One record of `items`.
struct Item {
  1: i32 id,
  2: string name,
}

service Echo {
  // Returns msg unchanged.
  string echo(1: string msg),
  // Returns msg after sleeping `seconds` (cooperatively).
  string slow_echo(1: string msg, 2: double seconds),
  i64 add(1: i64 a, 2: i64 b),
  // Does nothing: what health-checking pools (thrift-connector) call.
  void ping(),
  // "host:port" of the instance that answered.
  string whoami(),
  // Raises the declared exception.
  void refuse(1: string reason) throws (1: Refused err),
  // Raises an exception the IDL does not declare.
  void crash(1: string message),
  // Each count's key as bytes, keyed by the count: typed maps both ways.
  map<i32, binary> table(1: map<string, i32> counts),
  // `count` records (at most 100,000): a list of structs.
  list<Item> items(1: i32 count),
  // Oneway: no reply; the handler keeps the last 1,000 messages.
  oneway void notify(1: string msg),
}
