//! A DNS server on loopback for discovery tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType};
use hickory_resolver::proto::rr::rdata::A;
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

/// A DNS server on loopback answering A queries for one name with a changeable list.
pub struct TestDns {
    pub addr: SocketAddr,
    pub answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestDns {
    pub async fn start(name: &str, answers: Vec<Ipv4Addr>) -> TestDns {
        let mut fqdn = Name::from_ascii(name).unwrap();
        fqdn.set_fqdn(true);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers = Arc::new(Mutex::new(answers));
        let shared = answers.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                if query.metadata.message_type != MessageType::Query {
                    continue;
                }
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.metadata.recursion_available = true;
                reply.metadata.authoritative = true;
                reply.queries = query.queries.clone();
                match query.queries.first() {
                    Some(q) if *q.name() == fqdn => {
                        // AAAA gets an empty answer (no IPv6 replicas here).
                        if q.query_type() == RecordType::A {
                            for ip in shared.lock().unwrap().iter() {
                                reply.add_answer(Record::from_rdata(
                                    q.name().clone(),
                                    0,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                    }
                    _ => {
                        reply.metadata.response_code =
                            hickory_resolver::proto::op::ResponseCode::NXDomain
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        TestDns {
            addr,
            answers,
            task,
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}
