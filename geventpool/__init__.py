"""geventpool: client-side high availability for Thrift services on gevent."""
