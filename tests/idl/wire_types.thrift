// Every kind of Thrift type, nested: what the wire-layer tests walk and decode.

struct Inner {
  1: i32 a,
  2: string s,
  3: bool flag,
  4: list<i64> ids,
}

struct Outer {
  1: map<i32, binary> table,
  2: map<string, list<Inner>> groups,
  3: list<Inner> inners,
  4: set<string> tags,
  5: double d,
  6: byte b,
  7: i16 h,
  8: bool on,
  9: map<i64, double> m,
  10: list<list<i32>> ll,
  11: Inner one,
  12: list<bool> bits,
}

// A struct that holds itself: a value of it can nest without end, or be cyclic.
struct Node {
  1: list<Node> children,
}

service Types {
  void put(1: Outer outer, 2: Node node),
}
